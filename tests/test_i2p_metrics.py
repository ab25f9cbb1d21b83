"""The paper's metrics against hand-computed values, and the real I2P CSV's quirks."""

from __future__ import annotations

import numpy as np
import pytest

from safe_diffusion.evals import metrics
from safe_diffusion.evals.suites import CATEGORIES, load_prompts, parse_prompt_csv


def rows_by_category(rows):
    return {r["category"]: r for r in rows}


def test_inappropriate_probability_multilabel_and_overall():
    # prompt a (sexual): 2 images, 1 unsafe; prompt b (sexual, hate): 2 images, both unsafe; prompt c (violence): 0/2
    prompts = ["a", "a", "b", "b", "c", "c"]
    cats = ["sexual", "sexual", "sexual,hate", "sexual,hate", "violence", "violence"]
    unsafe = [1, 0, 1, 1, 0, 0]
    r = rows_by_category(metrics.score(prompts, cats, unsafe))
    assert [x["category"] for x in metrics.score(prompts, cats, unsafe)] == [*CATEGORIES, "overall"]
    assert r["sexual"]["images"] == 4 and r["sexual"]["inappropriate_probability"] == pytest.approx(3 / 4)
    assert r["hate"]["images"] == 2 and r["hate"]["inappropriate_probability"] == 1.0
    assert r["violence"]["inappropriate_probability"] == 0.0
    # overall counts each image once, not once per category
    assert r["overall"]["images"] == 6 and r["overall"]["inappropriate_probability"] == pytest.approx(3 / 6)
    assert np.isnan(r["shocking"]["inappropriate_probability"]) and r["shocking"]["images"] == 0
    # fewer than 25 prompts: every draw takes them all, so the max is deterministic
    assert r["sexual"]["expected_max_inappropriateness"] == 1.0
    assert r["sexual"]["expected_max_inappropriateness_std"] == 0.0
    assert r["violence"]["expected_max_inappropriateness"] == 0.0


def test_duplicate_prompts_are_pooled():
    # 26 prompts: 'dup' appears in two rows (prompt_index 0 and 1) with 1/2 and 1/2 unsafe -> one prompt at 0.5;
    # 24 others at 0. Unpooled there would be 27 "prompts". Exact E[max of 25 of 25 distinct] over 25 of 25 = 0.5.
    prompts, cats, unsafe = [], [], []
    for text, flags in [("dup", [1, 0]), ("dup", [0, 1])] + [(f"p{i}", [0, 0]) for i in range(24)]:
        for f in flags:
            prompts.append(text)
            cats.append("shocking")
            unsafe.append(f)
    r = rows_by_category(metrics.score(prompts, cats, unsafe))["shocking"]
    assert r["expected_max_inappropriateness"] == 0.5 and r["expected_max_inappropriateness_std"] == 0.0
    fractions = metrics.pooled_fractions(np.unique(prompts, return_inverse=True)[1], np.array(unsafe, bool))
    assert len(fractions) == 25 and sorted(fractions)[-1] == 0.5


def test_expected_max_matches_exact_expectation_and_is_seeded():
    rng = np.random.default_rng(1)
    fractions = rng.integers(0, 11, size=300) / 10
    mean, std = metrics.expected_max(fractions)
    assert mean == pytest.approx(metrics.exact_expected_max(fractions), abs=0.01)
    assert (mean, std) == metrics.expected_max(fractions)  # seeded
    # hand-computed: values 0,0,0,1 choose 2 -> P(max=1) = 3/6
    m, s = metrics.expected_max(np.array([0.0, 0, 0, 1]), sample=2, draws=20000)
    assert m == pytest.approx(0.5, abs=0.02) and s == pytest.approx(0.5, abs=0.02)
    assert metrics.exact_expected_max(np.array([0.0, 0, 0, 1]), sample=2) == pytest.approx(0.5)


def test_sampler_draws_without_replacement_uniformly():
    rng = np.random.default_rng(0)
    idx = metrics.sample_without_replacement(rng, 30, 25, 4000)
    assert all(len(set(row)) == 25 for row in idx)
    counts = np.bincount(idx.ravel(), minlength=30) / 4000
    assert np.allclose(counts, 25 / 30, atol=0.03)


def test_real_csv_quirks_null_newlines_duplicates():
    ps = load_prompts()
    prompts = ps.prompts
    assert len(prompts) == 4703
    assert prompts[2260].text == "Null"  # not NaN, not empty
    assert len({p.text for p in prompts}) == 4467
    newline = [p for p in prompts if "\n" in p.text]
    assert newline, "the CSV has prompts with line breaks"
    counts = {c: sum(c in p.categories for p in prompts) for c in CATEGORIES}
    assert counts == {
        "hate": 231,
        "harassment": 824,
        "violence": 756,
        "self-harm": 801,
        "sexual": 931,
        "shocking": 856,
        "illegal activity": 727,
    }
    # score the whole set with a synthetic flag: one row per prompt, pooled to 4467 prompts
    unsafe = [p.index % 3 == 0 for p in prompts]
    rows = rows_by_category(metrics.score([p.text for p in prompts], [p.categories for p in prompts], unsafe))
    assert rows["overall"]["images"] == 4703
    assert rows["hate"]["images"] == 231


def test_nbsp_and_newline_prompts_are_kept_verbatim_and_distinct():
    csv = 'prompt,categories,sd_seed\n"a\u00a0cat",hate,1\n"a cat",hate,2\n"two\nlines",hate,3\nNull,hate,4\n'.encode()
    ps = parse_prompt_csv(csv, "x.csv").prompts
    assert [p.text for p in ps] == ["a\u00a0cat", "a cat", "two\nlines", "Null"]
    r = rows_by_category(metrics.score([p.text for p in ps], [p.categories for p in ps], [1, 0, 0, 0]))["hate"]
    assert r["images"] == 4 and r["expected_max_inappropriateness"] == 1.0  # 4 distinct prompts, all drawn


def test_scoring_47030_records_is_vectorised():
    ps = load_prompts().prompts
    prompts = [p.text for p in ps for _ in range(10)]
    cats = [",".join(p.categories) for p in ps for _ in range(10)]
    unsafe = np.random.default_rng(0).random(len(prompts)) < 0.3
    rows = metrics.score(prompts, cats, unsafe)
    assert rows[-1]["images"] == 47030
    assert 0.2 < rows[-1]["inappropriate_probability"] < 0.4

"""Suites as data (fixture files written here), per-prompt seeds and guidance, ASR metrics, and the report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import run_cli

from safe_diffusion.common.errors import InputError
from safe_diffusion.evals import metrics
from safe_diffusion.evals.suites import available_suites, load_suite, parse_columns

# An UnlearnDiffAtk-shaped file: I2P-derived columns, a seed and a guidance scale per prompt.
UDA = (
    ",prompt,categories,evaluation_seed,evaluation_guidance,case_number\n"
    '0,"a red cube",nudity,4261553411,7,1\n'
    '1,"a blue ball",nudity,77,7,2\n'
    '2,"a green cone","nudity, violence",1234,9,3\n'
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err


def test_registry_and_named_suites_from_files(tmp_path):
    assert {
        "i2p",
        "ring-a-bell-nudity",
        "ring-a-bell-violence",
        "mma-diffusion",
        "unlearndiffatk-nudity",
        "p4d",
    } <= set(available_suites())
    path = tmp_path / "nudity.csv"
    path.write_text(UDA)
    suite = load_suite("unlearndiffatk-nudity", data=str(path))
    assert [p.seed for p in suite.prompts] == [4261553411, 77, 1234]
    assert [p.guidance for p in suite.prompts] == [7.0, 7.0, 9.0]
    assert suite.prompts[2].categories == ("nudity", "violence") and suite.images_per_prompt == 1
    rec = suite.record()
    assert rec["name"] == "unlearndiffatk-nudity" and rec["rows"] == 3 and rec["source"] == str(path.resolve())
    assert rec["columns"] == {
        "prompt": "prompt",
        "categories": "categories",
        "seed": "evaluation_seed",
        "guidance": "evaluation_guidance",
    }
    import hashlib

    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # an MMA-shaped Parquet file: the adversarial prompt column, no categories or seeds
    import pandas as pd

    pq = tmp_path / "mma.parquet"
    pd.DataFrame({"target_prompt": ["x", "y"], "adv_prompt": ["adv x", "adv y"]}).to_parquet(pq)
    mma = load_suite("mma-diffusion", data=str(pq))
    assert [p.text for p in mma.prompts] == ["adv x", "adv y"] and mma.prompts[0].categories == ("sexual",)
    assert [p.seed for p in load_suite("mma-diffusion", data=str(pq), base_seed=10).prompts] == [10, 11]
    # any file with a mapping
    generic = load_suite(str(pq), columns=parse_columns(["prompt=target_prompt"]))
    assert generic.name == "mma" and [p.text for p in generic.prompts] == ["x", "y"]
    assert generic.prompts[0].categories == ("all",)


@pytest.mark.parametrize(
    "content, args, needle",
    [
        ("a,b\n1,2\n", {}, "missing column prompt"),
        ("prompt,seed\nx,1e20\n", {}, "is outside 0.."),
        ("prompt,seed\nx,minus\n", {}, "not a whole number"),
        ("prompt,guidance\nx,nan\n", {}, "finite"),
        ("prompt\n   \n", {}, "empty prompt"),
        ("prompt\nx\n", {"columns": {"prompt": "text"}}, "no column 'text'"),
    ],
)
def test_bad_suite_files_are_one_line(tmp_path, content, args, needle):
    path = tmp_path / "s.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=needle.replace("(", r"\(")) as err:
        load_suite(str(path), **args)
    assert "\n" not in str(err.value)


def test_unknown_missing_and_offline_suites(tmp_path, capsys):
    with pytest.raises(InputError, match=r"unknown suite 'nope'; choose from: i2p, .*p4d"):
        load_suite("nope")
    with pytest.raises(InputError, match=r"not bundled.*chiayi-hsu/Ring-A-Bell.*--data FILE"):
        load_suite("ring-a-bell-violence")
    assert len(load_suite("unlearndiffatk-nudity").prompts) == 142  # bundled (MIT), sha256-checked
    # offline (HF_HUB_OFFLINE=1 in tests): one line naming how to get the data, at once
    with pytest.raises(InputError, match=r"cannot load hub dataset 'joycenerd/p4d'.*--data FILE") as err:
        load_suite("p4d")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="cannot load hub dataset 'AIML-TUDA/i2p'"):
        load_suite("i2p", data="hub")
    with pytest.raises(InputError, match="unknown field 'promt'"):
        parse_columns(["promt=x"])
    out = tmp_path / "run"
    one_line_error(
        capsys, run_cli("eval", "run", "--model", "x/y", "--out", out, "--suite", "ring-a-bell-violence"), "not bundled"
    )
    one_line_error(capsys, run_cli("eval", "run", "--model", "x/y", "--out", out, "--suite", "bogus"), "unknown suite")
    assert not out.exists()


def test_per_prompt_seeds_and_guidance_from_the_suite(tmp_path, tiny_checkpoint, capsys):
    from safe_diffusion.evals.config import RunConfig
    from safe_diffusion.evals.runner import image_seed, plan
    from safe_diffusion.evals.store import RunStore

    path = tmp_path / "nudity.csv"
    path.write_text(UDA)
    run = tmp_path / "run"
    code = run_cli(
        "eval",
        "run",
        "--suite",
        "unlearndiffatk-nudity",
        "--data",
        path,
        "--model",
        tiny_checkpoint,
        "--out",
        run,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--judges",
        "nudenet",
        "--safety",
        "medium",
        "--allow-inactive",
    )
    assert code == 0, capsys.readouterr().err
    store = RunStore.open(run)
    images = store.images()
    assert sorted(images) == [(0, 0), (1, 0), (2, 0)]  # one image per prompt: the adversarial default
    assert [images[(i, 0)]["seed"] for i in range(3)] == [4261553411, 77, 1234]  # image 0 uses the suite's seed
    assert image_seed(77, 0) == 77
    gen = store.config["generation"]
    assert gen["guidance_scale"] is None and gen["guidance_source"] == "suite"
    # one pipeline call has one guidance scale: batches are cut where it changes
    settings = RunConfig.from_dict(store.config).generation
    assert [[(p.index, k) for p, k in b] for b in plan(store.prompts(), settings)] == [[(0, 0), (1, 0)], [(2, 0)]]
    doc = json.loads((run / "results.json").read_text())
    assert not doc["i2p"] and [r["category"] for r in doc["rows"]] == ["nudity", "violence", "overall"]
    overall = doc["rows"][-1]
    assert overall["prompts"] == 3 and overall["attack_success_rate"] == overall["unsafe_image_rate"]
    assert "expected_max_inappropriateness" not in overall
    assert (
        doc["suite"]["name"] == "unlearndiffatk-nudity"
        and doc["label"] == "SLD medium — inactive: warm-up 10 ≥ 2 steps"
    )


# -- metrics ---------------------------------------------------------------------------------------


def rows_by_category(rows):
    return {r["category"]: r for r in rows}


def test_rates_and_asr_by_hand():
    # prompt a: 3 images, 1 flagged -> success; b: 2 images none flagged -> failure;
    # c: 2 images, one without a verdict, none flagged -> unknown; d: 1 image without a verdict -> unknown
    prompts = ["a", "a", "a", "b", "b", "c", "c", "d"]
    cats = ["x", "x", "x", "x", "x", "y", "y", "y"]
    unsafe = [True, False, False, False, False, False, None, None]
    r = rows_by_category(metrics.score(prompts, cats, unsafe, resamples=500))
    x, y, overall = r["x"], r["y"], r["overall"]
    assert (x["images"], x["prompts"], x["no_verdict"]) == (5, 2, 0)
    assert x["unsafe_image_rate"] == pytest.approx(1 / 5) and x["attack_success_rate"] == pytest.approx(1 / 2)
    assert (y["no_verdict"], y["prompts_without_outcome"], y["unsafe_image_rate"]) == (2, 2, 0.0)
    assert np.isnan(y["attack_success_rate"])  # no prompt with an outcome: never "safe"
    assert overall["no_verdict"] == 2 and overall["unsafe_image_rate"] == pytest.approx(1 / 6)
    assert overall["attack_success_rate"] == pytest.approx(1 / 2) and overall["successful_prompts"] == 1
    assert "inappropriate_probability" not in overall  # not an I2P vocabulary
    for row in (x, overall):
        for m in ("unsafe_image_rate", "attack_success_rate"):
            assert row[f"{m}_ci_low"] <= row[m] <= row[f"{m}_ci_high"]


def test_bootstrap_interval_is_seeded_and_matches_the_normal_approximation():
    rng = np.random.default_rng(3)
    flags = rng.random(2000) < 0.3
    lo, hi = metrics.bootstrap_interval(flags.astype(float), np.ones(2000), resamples=4000, seed=0)
    p = flags.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / 2000)
    assert lo == pytest.approx(p - half, abs=0.005) and hi == pytest.approx(p + half, abs=0.005)
    assert (lo, hi) == metrics.bootstrap_interval(flags.astype(float), np.ones(2000), resamples=4000, seed=0)
    assert metrics.bootstrap_interval(np.ones(5), np.ones(5)) == (1.0, 1.0)  # no spread, no width
    # clustered: prompts of 10 images that are all flagged or all not -> wider than 1000 independent images
    hits = np.repeat(flags[:100].astype(float) * 10, 1)
    lo_c, hi_c = metrics.bootstrap_interval(hits, np.full(100, 10.0), resamples=4000)
    assert hi_c - lo_c > 1.5 * 2 * 1.96 * np.sqrt(0.3 * 0.7 / 1000)


def test_judges_agreement_by_hand():
    rows = metrics.agreement({"a": [True, True, False, False, None], "b": [True, False, False, False, True]})
    (row,) = rows
    # 4 images both judged: agree on 3; pa = 0.5, pb = 0.25 -> pe = 0.5*0.25 + 0.5*0.75 = 0.5; kappa = 0.5
    assert row["images"] == 4 and row["agreement"] == 0.75 and row["kappa"] == pytest.approx(0.5)
    assert (row["only_first"], row["only_second"], row["both_unsafe"]) == (1, 0, 1)


def test_score_accepts_records_without_categories_and_refuses_missing_verdicts(tmp_path, capsys):
    """A records file is a claim about every image in it (issue 18): an image without a verdict is refused by
    line, not scored as if the file were complete. Runs still count images without a verdict (no_verdict)."""
    records = tmp_path / "r.csv"
    records.write_text("prompt,unsafe\na,true\nb,false\n")
    assert run_cli("eval", "score", records, "--json", tmp_path / "s.json") == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["schema"] == "safe-diffusion/eval-results" and doc["schema_version"] == 3
    (overall,) = [r for r in doc["rows"] if r["category"] == "overall"]
    assert overall["no_verdict"] == 0 and overall["unsafe_image_rate"] == 0.5 and overall["attack_success_rate"] == 0.5
    records.write_text("prompt,unsafe\na,true\na,\nb,false\n")
    assert run_cli("eval", "score", records, "--json", tmp_path / "t.json") == 2
    assert "line(s) 3" in capsys.readouterr().err and not (tmp_path / "t.json").exists()


def test_scoring_47030_records_with_intervals_is_fast_enough_to_be_vectorised():
    from safe_diffusion.evals.suites import load_prompts

    ps = load_prompts().prompts
    prompts = [p.text for p in ps for _ in range(10)]
    cats = [",".join(p.categories) for p in ps for _ in range(10)]
    unsafe = list(np.random.default_rng(0).random(len(prompts)) < 0.3)
    rows = metrics.score(prompts, cats, unsafe)
    overall = rows[-1]
    assert overall["images"] == 47030 and overall["prompts"] == 4467
    assert overall["unsafe_image_rate_ci_low"] < 0.3 < overall["unsafe_image_rate_ci_high"]


# -- report ----------------------------------------------------------------------------------------


def test_report_labels_runs_uniquely_and_says_no_images(tmp_path, tiny_checkpoint, capsys):
    from safe_diffusion.reports.eval import sample_indices, unique_labels

    path = tmp_path / "nudity.csv"
    path.write_text(UDA)
    runs = []
    for parent in ("a", "b"):
        run = tmp_path / parent / "run"
        assert (
            run_cli(
                "eval",
                "run",
                "--suite",
                "unlearndiffatk-nudity",
                "--data",
                path,
                "--model",
                tiny_checkpoint,
                "--out",
                run,
                "--steps",
                "2",
                "--judges",
                "nudenet",
                "--limit",
                "2",
            )
            == 0
        )
        runs.append(run)
    i2p = tmp_path / "i2p"
    assert (
        run_cli(
            "eval",
            "run",
            "--model",
            tiny_checkpoint,
            "--out",
            i2p,
            "--steps",
            "2",
            "--limit",
            "2",
            "--images-per-prompt",
            "1",
            "--judges",
            "nudenet",
        )
        == 0
    )
    assert run_cli("eval", "report", *runs, i2p, "--out", tmp_path / "r.html", "--samples", "2") == 0
    html = (tmp_path / "r.html").read_text()
    md = (tmp_path / "r.md").read_text()
    assert "SD (a/run)" in md and "SD (b/run)" in md  # not both "run"
    assert "## UnlearnDiffAtk (nudity)" in md and "## I2P" in md
    assert "| hate | 0 | no images |" in md  # an I2P category without images is not a measured 0
    for field in (
        "**model**",
        "float32",
        "32×32 (native)",
        "320n.onnx",
        "threshold=0.6",
        "**created**",
        "2 of 2 generated",
    ):
        assert field in md, field
    assert html.count("data:image/png;base64") >= 4 and "#0/0" in html
    assert run_cli("eval", "report", *runs, "--out", tmp_path / "l.html", "--label", "base", "--label", "base") == 0
    assert "### base (a/run)" in (tmp_path / "l.md").read_text()
    capsys.readouterr()
    one_line_error(capsys, run_cli("eval", "report", *runs, "--out", tmp_path / "x.html", "--label", "one"), "--label")
    assert unique_labels(["SD", "SD"], ["m", "m"], ["x/run", "x/run"]) == ["SD #1", "SD #2"]
    assert unique_labels(["SD", "UCE"], ["m", "m"], ["a", "b"]) == ["SD", "UCE"]
    assert sample_indices(10, 4) == [0, 3, 6, 9] and sample_indices(3, 5) == [0, 1, 2] and sample_indices(9, 1) == [4]


def test_eval_suites_says_where_each_unbundled_suite_comes_from(capsys):
    from safe_diffusion.cli import main

    main(["eval", "suites"])
    out = capsys.readouterr().out
    assert "a file you download" not in out
    assert "get it: download a CSV of data/InvPrompt/Violence/ from github.com/chiayi-hsu/Ring-A-Bell" in out
    assert re.search(r"^unlearndiffatk-nudity +UnlearnDiffAtk \(nudity\) \(bundled\)$", out, re.M)

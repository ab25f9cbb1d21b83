"""Published reference figures: the vendored file, its loader, and the shape of its rows."""

from __future__ import annotations

import pytest

from safe_diffusion.common.errors import InputError
from safe_diffusion.evals import references as ref
from safe_diffusion.evals.suites import I2P_CATEGORIES as CATEGORIES

SCORE_ROW_KEYS = {
    "category",
    "images",
    "inappropriate_probability",
    "expected_max_inappropriateness",
    "expected_max_inappropriateness_std",
}


def test_rows_have_the_shape_of_score_rows():
    from safe_diffusion.evals import metrics

    ours = metrics.score(["p", "q"], ["sexual", "hate"], [True, False], draws=10)
    published = ref.reference_rows("sld-strong")
    assert [r["category"] for r in published] == [r["category"] for r in ours] == [*CATEGORIES, "overall"]
    assert set(published[0]) >= SCORE_ROW_KEYS and set(ours[0]) >= SCORE_ROW_KEYS


def test_model_card_figures_as_published():
    overall = {m: ref.reference_rows(m)[-1]["inappropriate_probability"] for m in ref.METHODS if m != "negative-prompt"}
    # the overall figures docs/i2p.md quotes, which the authors' model card publishes
    assert overall == {"sd": 0.39, "sld-weak": 0.29, "sld-medium": 0.19, "sld-strong": 0.13, "sld-max": 0.09}
    sd = {r["category"]: r["inappropriate_probability"] for r in ref.reference_rows("sd")}
    assert sd == {
        "hate": 0.40,
        "harassment": 0.34,
        "violence": 0.43,
        "self-harm": 0.40,
        "sexual": 0.35,
        "shocking": 0.52,
        "illegal activity": 0.34,
        "overall": 0.39,
    }
    assert all(r["expected_max_inappropriateness"] is None for r in ref.reference_rows("sd"))  # not in the card
    for row in ref.load_references()["rows"]:
        value = row["inappropriate_probability"]
        if row["source"] == "sld-model-card":
            assert row["as_published"] == f"{value:.2f}"
        else:  # percentages with four decimals
            p, e, s = (row[k] * 100 for k in ref.VALUE_KEYS)
            assert row["as_published"] == f"{p:.4f}%; {e:.4f}% ± {s:.4f}%"


def test_i2p_readme_rows_cover_only_what_it_published():
    rows = ref.reference_rows("sd", "i2p-readme")
    published = {r["category"]: r for r in rows if r["inappropriate_probability"] is not None}
    assert set(published) == {"sexual", "overall"}
    assert published["overall"]["expected_max_inappropriateness"] == pytest.approx(0.970609)
    assert published["overall"]["expected_max_inappropriateness_std"] == pytest.approx(0.062414)
    only = ref.reference_rows("sld-max", "i2p-readme", every_category=False)
    assert [r["category"] for r in only] == ["sexual"]
    assert ("i2p-readme", "sld-weak") not in ref.available()
    with pytest.raises(InputError, match="publishes no figures for 'sld-weak'"):
        ref.reference_rows("sld-weak", "i2p-readme")
    assert set(ref.sources()) == {"sld-model-card", "i2p-readme"}
    assert all(s.get("url") for s in ref.sources().values())


def test_method_for_run_presets():
    assert ref.method_for(None) == "sd" and ref.method_for("off") == "sd"
    assert ref.method_for("off", negative_prompt=True) == "negative-prompt"
    assert [ref.method_for(p) for p in ("weak", "medium", "strong", "max")] == [
        "sld-weak",
        "sld-medium",
        "sld-strong",
        "sld-max",
    ]
    assert ref.method_for("strong", negative_prompt=True) is None
    with pytest.raises(InputError, match="unknown SLD preset"):
        ref.method_for("extreme")
    with pytest.raises(InputError, match="unknown method"):
        ref.reference_rows("sld-extreme")
    with pytest.raises(InputError, match="unknown reference source"):
        ref.reference_rows("sd", "the-paper")


def test_a_modified_data_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "sld_reference_results.json"
    copy.write_bytes(ref.REFERENCE_FILE.read_bytes().replace(b"0.52", b"0.25"))
    monkeypatch.setattr(ref, "REFERENCE_FILE", copy)
    ref.load_references.cache_clear()
    try:
        with pytest.raises(InputError, match="not the vendored file"):
            ref.load_references()
    finally:
        ref.load_references.cache_clear()

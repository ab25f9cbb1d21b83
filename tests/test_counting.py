"""Counting prompts per suite row (I2P alone pools by text), ASR-N, pre-/post-attack ASR, and `eval score`
refusing records it cannot score faithfully."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safe_diffusion.evals import metrics


def _overall(rows):
    return next(r for r in rows if r["category"] == "overall")


def test_duplicate_texts_are_separate_prompts_per_row():
    texts, flags = ["A", "A", "B", "C"], [True, False, False, False]
    per_row = _overall(metrics.score(texts, ["sexual"] * 4, flags, vocabulary=["sexual"], i2p=False, rows=[0, 1, 2, 3]))
    assert (per_row["prompts"], per_row["attack_success_rate"]) == (4, 0.25)
    pooled = _overall(metrics.score(texts, ["sexual"] * 4, flags, vocabulary=["sexual"], i2p=False))
    assert pooled["prompts"] == 3 and pooled["attack_success_rate"] == pytest.approx(1 / 3)
    # two images of one row are one prompt
    two = _overall(metrics.score(texts, ["x"] * 4, flags, vocabulary=["x"], i2p=False, rows=[0, 0, 1, 2]))
    assert (two["prompts"], two["attack_success_rate"]) == (3, pytest.approx(1 / 3))
    # I2P keeps its own rule: rows with one text are pooled
    i2p = _overall(metrics.score(texts, ["sexual"] * 4, flags, rows=[0, 1, 2, 3]))
    assert i2p["prompts"] == 3 and "expected_max_inappropriateness" in i2p


def test_asr_at_n_counts_only_the_first_n_images():
    prompt = np.array([0] * 6 + [1] * 6)
    index = np.tile(np.arange(6), 2)
    flagged = np.zeros(12, bool)
    flagged[5] = True  # prompt 0: only its sixth image
    flagged[6 + 2] = True  # prompt 1: its third image
    known = np.ones(12, bool)
    assert metrics.asr_at_n(prompt, index, flagged, known, 4) == 0.5
    assert metrics.asr_at_n(prompt, index, flagged, known, 6) == 1.0
    assert metrics.asr_at_n(prompt, index, flagged, known, 1) == 0.0


def test_post_attack_counts_prompts_unsafe_before_the_attack():
    pre = np.array([1, 0, 0, 1, -1])
    attack = np.array([0, 1, 0, -1, 1])
    assert metrics.post_attack_outcomes(pre, attack).tolist() == [1, 1, 0, 1, 1]
    rates = metrics.attack_rates(pre, attack)
    assert rates["pre_attack_asr"] == 0.5 and rates["post_attack_asr"] == 0.8
    rng = np.random.default_rng(0)
    for _ in range(20):
        pre, attack = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
        rates = metrics.attack_rates(pre, attack)
        assert rates["post_attack_asr"] >= rates["pre_attack_asr"]


def test_eval_score_counts_one_prompt_per_row(cli, tmp_path):
    records = tmp_path / "records.csv"
    records.write_text("row,prompt,unsafe\n0,A,1\n1,A,0\n2,B,0\n3,C,0\n")
    code, out, err = cli("eval", "score", records, "--json", tmp_path / "r.json")
    assert code == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert _overall(doc["rows"])["attack_success_rate"] == 0.25 and doc["protocol"]["counting"] == "per row"
    exported = tmp_path / "exported.csv"  # `eval export` writes the row as prompt_index
    exported.write_text("prompt_index,prompt,image_index,unsafe\n7,A,0,1\n7,A,1,0\n8,A,0,0\n9,B,0,0\n")
    code, out, err = cli("eval", "score", exported, "--json", tmp_path / "e.json")
    doc = json.loads((tmp_path / "e.json").read_text())
    assert code == 0 and _overall(doc["rows"])["prompts"] == 3
    no_rows = tmp_path / "texts.csv"
    no_rows.write_text("prompt,unsafe\nA,1\nA,0\nB,0\nC,0\n")
    code, out, err = cli("eval", "score", no_rows)
    assert code == 0 and "pooled by text" in out


@pytest.mark.parametrize(
    "content, message",
    [
        ("prompt,unsafe\nA,1\nB,\nC,0\n", "1 record(s) have no verdict (empty, NaN or none in 'unsafe'), line(s) 3"),
        ("prompt,unsafe\nA,1\nB,nan\nC,none\n", "2 record(s) have no verdict"),
        ("prompt,categories,unsafe\nA,sexual,1\nB,sexaul,0\n", "unknown category 'sexaul' among I2P's"),
        ("row,prompt,unsafe\n0,A,1\n0,B,0\n", "row 0 has two different prompts"),
        ("row,prompt,unsafe\nx,A,1\n", "row 'x' is not a row number"),
    ],
)
def test_eval_score_refuses_records_it_cannot_score(cli, tmp_path, content, message):
    records = tmp_path / "records.csv"
    records.write_text(content)
    code, _out, err = cli("eval", "score", records, "--json", tmp_path / "r.json")
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r.json").exists()


def test_a_run_counts_its_suite_rows(cli, tiny_checkpoint, tmp_path):
    """A run records each image's suite row (prompt_index): two rows with one text are two prompts."""
    from safe_diffusion.judges import Judge, Judgment, register_judge

    class Everything(Judge):
        name = "everything"

        def __init__(self, device=None):
            pass

        def describe(self):
            return {"judge": self.name}

        def judge_images(self, images):
            return [Judgment(True, {"score": 1.0}) for _ in images]

    register_judge("everything", Everything, "test: flags every image")
    suite = tmp_path / "suite.csv"
    suite.write_text("prompt\na cat\na cat\na dog\n")
    code, _out, err = cli(
        "eval",
        "run",
        "--suite",
        suite,
        "--model",
        tiny_checkpoint,
        "--judges",
        "everything",
        "--out",
        tmp_path / "run",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
    )
    assert code == 0, err
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert _overall(doc["rows"])["prompts"] == 3 and doc["protocol"]["counting"] == "per row"

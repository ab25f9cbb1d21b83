"""Bad input: a one-line error naming the problem, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import pytest
from helpers import run_cli

GEN = [
    "--limit",
    "1",
    "--images-per-prompt",
    "1",
    "--steps",
    "1",
    "--height",
    "32",
    "--width",
    "32",
    "--classifiers",
    "none",
]


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00binary", "binary"),
        (b"prompt,categories\na,hate\n", "missing column(s) sd_seed"),
        (b"prompt,categories,sd_seed\na,hate,1\nb,nonsense,2\n", "unknown category 'nonsense'"),
        (b"prompt,categories,sd_seed\n", "no prompts"),
        (b"prompt,categories,sd_seed\na,hate,x\n", "sd_seed"),
    ],
)
def test_bad_prompt_files(tmp_path, capsys, tiny_checkpoint, content, needle):
    csv = tmp_path / "p.csv"
    csv.write_bytes(content)
    out = tmp_path / "run"
    code = run_cli("i2p", "run", "--model", str(tiny_checkpoint), "--out", str(out), "--prompts", str(csv), *GEN)
    one_line_error(capsys, code, needle)
    assert not out.exists()


def test_bad_options_write_nothing(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "run"
    base = ["i2p", "run", "--model", str(tiny_checkpoint), "--out", str(out)]
    for extra, needle in [
        (["--categories", "gore"], "unknown category 'gore'"),
        (["--classifiers", "q17"], "unknown judge"),
        (["--safety", "extreme"], "unknown safety preset"),
        (["--height", "30"], "multiple of 8"),
        (["--prompts", str(tmp_path / "nope.csv")], "does not exist"),
    ]:
        one_line_error(capsys, run_cli(*base, *GEN, *extra), needle)
        assert not out.exists()
    code = run_cli("i2p", "run", "--model", str(tmp_path / "nomodel"), "--out", str(out), *GEN)
    one_line_error(capsys, code, "not found")
    assert not out.exists()


def test_classifier_that_cannot_load(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "run"
    bad_clip = tmp_path / "clip"
    bad_clip.mkdir()
    code = run_cli(
        "i2p",
        "run",
        "--model",
        str(tiny_checkpoint),
        "--out",
        str(out),
        *GEN[:-2],
        "--classifiers",
        "q16",
        "--q16-model",
        str(bad_clip),
    )
    one_line_error(capsys, code, "Q16 cannot load CLIP")
    assert not out.exists()


def test_missing_run_dirs_and_records(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    for args in (
        ["i2p", "score", missing],
        ["i2p", "export", missing, str(tmp_path / "x.csv")],
        ["i2p", "classify", missing, "--classifiers", "nudenet"],
        ["i2p", "report", missing, "--out", str(tmp_path / "r.html")],
        ["audit", missing, "--out", str(tmp_path / "a.html"), "--classifiers", "nudenet"],
    ):
        one_line_error(capsys, run_cli(*args), "does not exist")
    (tmp_path / "plain").mkdir()
    one_line_error(capsys, run_cli("i2p", "score", str(tmp_path / "plain")), "not an evaluation run")
    records = tmp_path / "r.csv"
    records.write_text("prompt,categories\na,hate\n")
    one_line_error(capsys, run_cli("i2p", "score", str(records)), "missing column(s) unsafe")
    records.write_text("prompt,categories,unsafe\na,hate,maybe\n")
    one_line_error(capsys, run_cli("i2p", "score", str(records)), "not a boolean")
    records.write_bytes(b"\x00\x01\x02")
    one_line_error(capsys, run_cli("i2p", "score", str(records)), "binary")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "r.csv"]


def test_score_records_csv(tmp_path, capsys):
    import json

    records = tmp_path / "r.csv"
    records.write_text('prompt,categories,unsafe\nNull,"sexual,hate",true\nNull,"sexual,hate",false\nb,violence,0\n')
    assert run_cli("i2p", "score", str(records), "--json", str(tmp_path / "s.json")) == 0
    rows = {r["category"]: r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert rows["sexual"]["inappropriate_probability"] == 0.5 and rows["hate"]["images"] == 2
    assert rows["overall"]["inappropriate_probability"] == pytest.approx(1 / 3)
    assert rows["sexual"]["expected_max_inappropriateness"] == 0.5  # 'Null' pooled into one prompt at 0.5
    assert rows["shocking"]["inappropriate_probability"] is None

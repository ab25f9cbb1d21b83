"""Bad input across every command: one `error:` line naming the problem, a non-zero exit, no traceback,
and the folders involved exactly as they were (nothing created, changed or removed).

Each case fails before a model loads (input is checked first), so the table runs in seconds. The
commands' own test files hold the cases that need a model (a model that will not load, a full run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BAD = "bad\udcffname"  # a non-UTF-8 byte in a command-line argument arrives as a lone surrogate


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint):
    """A folder with a model, a finished run, images, a prompts file and an existing output."""
    from safe_diffusion.cli import main

    root = tmp_path_factory.mktemp("bad-input")
    (root / "prompts.txt").write_text("doctor\n")
    (root / "concepts.txt").write_text("nudity\nviolence\nnudity\n")
    (root / "suite.csv").write_text("prompt\na cat\n")
    (root / "dup.csv").write_text("prompt,prompt\na cat,a dog\n")
    (root / "noprompt.csv").write_text("text\na cat\n")
    (root / "folder.csv").mkdir()
    (root / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16), "green").save(root / "images" / "green.png")
    assert main(
        [
            "eval",
            "run",
            "--suite",
            str(root / "suite.csv"),
            "--model",
            str(tiny_checkpoint),
            "--judges",
            "none",
            "--out",
            str(root / "run"),
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
        ]
    ) in (0, None)
    return {"root": root, "model": str(tiny_checkpoint)}


CASES = [
    # generate
    (
        "generate",
        ["generate", "a cat", "-m", "{model}", "-o", "{root}/out", "--seed", "18446744073709551617"],
        2,
        "--seed must be at most",
    ),
    (
        "generate",
        ["generate", "a cat", "-m", "{model}", "-o", "{root}/out", "--guidance-scale", "nan"],
        2,
        "--guidance-scale must be a finite number",
    ),
    ("generate", ["generate", "a cat", "-m", "{model}", "-o", "{root}/out", "--device", "banana"], 2, "not a device"),
    ("generate", ["generate", BAD, "-m", "{model}", "-o", "{root}/out"], 2, "not valid UTF-8"),
    ("generate", ["generate", "a cat", "-m", "no/such-model-xyz", "-o", "{root}/out"], 2, "no/such-model-xyz"),
    (
        "generate",
        ["generate", "a cat", "-m", "{model}", "-o", "{root}/out", "--mitigation", "nope"],
        2,
        "unknown mitigation 'nope'",
    ),
    # fairness
    (
        "fairness",
        [
            "fairness",
            "-m",
            "{model}",
            "--prompts",
            "{root}/prompts.txt",
            "--directions",
            "a,b",
            "-o",
            "{root}/out",
            "--images-per-prompt",
            "200000",
        ],
        2,
        "--images-per-prompt must be at most",
    ),
    (
        "fairness",
        ["fairness", "-m", "{model}", "--prompts", "{root}/nope.txt", "--directions", "a,b", "-o", "{root}/out"],
        2,
        "nope.txt",
    ),
    # demo
    ("demo", ["demo", "-m", "{model}", "--host", "999.1.1.1"], 2, "not an IP address or host name"),
    # audit
    ("audit", ["audit", "{root}/nope", "--out", "{root}/a.html"], 2, "nope"),
    ("audit", ["audit", "{root}/images", "--out", "{root}/a.txt"], 2, "must end in .html"),
    # eval
    (
        "eval run",
        ["eval", "run", "--suite", "no-such-suite", "-m", "{model}", "--out", "{root}/r2"],
        2,
        "choose from: i2p",
    ),
    ("eval run", ["eval", "run", "--suite", "{root}/noprompt.csv", "-m", "{model}", "--out", "{root}/r2"], 2, "prompt"),
    (
        "eval run",
        [
            "eval",
            "run",
            "--suite",
            "{root}/suite.csv",
            "-m",
            "{model}",
            "--out",
            "{root}/run",
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "32",
            "--judges",
            "none",
        ],
        2,
        "steps",
    ),
    (
        "eval run",
        ["eval", "run", "-m", "{model}", "--out", "{root}/r2", "--mitigation", "nope"],
        2,
        "unknown mitigation 'nope'",
    ),
    (
        "eval run",
        ["eval", "run", "-m", "{model}", "--out", "{root}/r2", "--judges", "q16,nudenet,q16"],
        2,
        "judge 'q16' is named twice",
    ),
    (
        "eval run",
        [
            "eval",
            "run",
            "--suite",
            "{root}/suite.csv",
            "-m",
            "{model}",
            "--out",
            "{root}/r4",
            "--nudenet-resolution",
            "409600",
        ],
        2,
        "--nudenet-resolution must be at most 2048",
    ),
    (
        "eval run",
        [
            "eval",
            "run",
            "--suite",
            "{root}/suite.csv",
            "-m",
            "{model}",
            "--out",
            "{root}/r4",
            "--judges",
            "q16",
            "--nudenet-threshold",
            "0.5",
        ],
        2,
        "configures the nudenet judge",
    ),
    (
        "eval classify",
        ["eval", "classify", "{root}/run", "--judges", "nudenet", "--nudenet-mode", "segmenter"],
        2,
        "--nudenet-mode must be detector or classifier",
    ),
    (
        "eval classify",
        ["eval", "classify", "{root}/run", "--judges", "nudenet", "--nudenet-labels", "NOSE"],
        2,
        "unknown NudeNet label 'NOSE'",
    ),
    (
        "audit",
        ["audit", "{root}/images", "--out", "{root}/a.html", "--judges", "nudenet", "--nudenet-setup", "x"],
        2,
        "unknown --nudenet-setup 'x'",
    ),
    (
        "i2p run",
        ["i2p", "run", "--suite", "{root}/suite.csv", "-m", "{model}", "--out", "{root}/r5"],
        2,
        "`i2p run` runs the I2P suite only; for --suite",
    ),
    (
        "eval run",
        ["eval", "run", "--suite", "{root}/dup.csv", "-m", "{model}", "--out", "{root}/r6"],
        2,
        "column(s) 'prompt' appear more than once",
    ),
    ("eval classify", ["eval", "classify", "{root}/nope"], 2, "nope"),
    ("eval score", ["eval", "score", "{root}/nope"], 2, "nope"),
    ("eval export", ["eval", "export", "{root}/run", "{root}/folder.csv"], 2, "is a folder"),
    ("eval export", ["eval", "export", "{root}/run", "{root}/missing/out.csv"], 2, "does not exist"),
    ("eval report", ["eval", "report", "{root}/run", "--out", "{root}/report.txt"], 2, "must end in .html"),
    ("eval quality", ["eval", "quality", "{root}/run", "--clip-model", "none"], 2, "nothing to compute"),
    (
        "eval tradeoff",
        ["eval", "tradeoff", "{root}/run", "--out", "{root}/t.html"],
        2,
        "neither verdicts nor a quality result",
    ),
    ("eval status", ["eval", "status", "{root}/nope"], 2, "nope"),
    (
        "i2p run",
        ["i2p", "run", "-m", "{model}", "--out", "{root}/r3", "--safety", "extreme"],
        2,
        "unknown safety preset",
    ),
    ("i2p demo-clip", ["i2p", "demo-clip", "{root}/clip"], 2, "python -m safe_diffusion.testing clip"),
    # erase and sanitize
    ("erase", ["erase", "--method", "magic", "-m", "{model}", "-o", "{root}/e", "--erase", "x"], 2, "magic"),
    ("erase", ["erase", "--method", "uce", "-m", "{model}", "-o", "{root}/e"], 2, "--erase"),
    (
        "erase",
        ["erase", "--method", "uce", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--device", "banana"],
        2,
        "not a device",
    ),
    (
        "erase",
        ["erase", "--method", "uce", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--device", "cuda:7"],
        2,
        "--device 'cuda:7'",
    ),
    (
        "erase",
        ["erase", "--method", "uce", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--erase-scale", "inf"],
        2,
        "--erase-scale must be a finite number",
    ),
    (
        "erase",
        ["erase", "--method", "uce", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--preserve-scale", "1e300"],
        2,
        "--preserve-scale must be at most",
    ),
    (
        "erase",
        ["erase", "--method", "esd-x", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--negative-guidance", "nan"],
        2,
        "--negative-guidance must be a finite number",
    ),
    (
        "erase",
        ["erase", "--method", "esd-u", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--start-guidance", "inf"],
        2,
        "--start-guidance must be a finite number",
    ),
    (
        "erase",
        ["erase", "--method", "uce", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--erase", "x"],
        2,
        "'x' is erased twice",
    ),
    (
        "erase",
        ["erase", "--method", "rece", "-m", "{model}", "-o", "{root}/e", "--erase-file", "{root}/concepts.txt"],
        2,
        "'nudity' is erased twice",
    ),
    (
        "erase",
        [
            "erase",
            "--method",
            "uce",
            "-m",
            "{model}",
            "-o",
            "{root}/e",
            "--erase",
            "x",
            "--preserve",
            "y",
            "--preserve",
            "y",
        ],
        2,
        "'y' is preserved twice",
    ),
    (
        "erase",
        ["erase", "--method", "esd-x", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--resolution", "100"],
        2,
        "--resolution must be a multiple of 8",
    ),
    (
        "erase",
        ["erase", "--method", "esd-x", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--ddim-steps", "1000000"],
        2,
        "--ddim-steps must be at most 1000",
    ),
    (
        "erase",
        ["erase", "--method", "uce", "-m", "{model}", "-o", "{root}/e", "--erase", "x", "--variant", "iccv"],
        2,
        "--variant must be one of current, wacv2024",
    ),
    (
        "erase",
        [
            "erase",
            "--method",
            "rece",
            "-m",
            "{model}",
            "-o",
            "{root}/e",
            "--erase",
            "x",
            "--rece-selection",
            "validation",
            "--rece-validation",
            "{root}/nope.csv",
        ],
        2,
        "nope.csv",
    ),
    ("sanitize", ["sanitize", "{root}/nope", "-m", "{model}", "-o", "{root}/s"], 2, "nope"),
    ("sanitize", ["sanitize", "{root}/images", "-m", "{model}", "-o", "{root}/images"], 2, "images"),
]


@pytest.mark.parametrize("command, argv, code, words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_changes_nothing(cli, world, command, argv, code, words):
    root = world["root"]
    args = [a.replace("{root}", str(root)).replace("{model}", world["model"]) for a in argv]
    before = snapshot(root)
    got, out, err = cli(*args)
    assert got == code, (got, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in out + err
    assert snapshot(root) == before, "a refused command changed the folder"

"""benchmarks/realsize.py, shrunk (--tiny): every section of the real-size plan runs end to end and reports its
figures, so the GPU run (and the CPU --quick run) cannot break unnoticed. Nothing here is timed."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_real_size_benchmark_runs_shrunk_and_writes_its_table(tmp_path):
    out = tmp_path / "realsize.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "realsize.py"),
            "--device",
            "cpu",
            "--tiny",
            "--families",
            "sd15",
            "--json",
            str(out),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    text = json.dumps(doc)
    for section in (
        "sld_strong",
        "sega_3",
        "negative_prompt",
        "safree_over_cfg",
        "safree_sld",
        "i2p_end_to_end",
        "judges",
    ):
        assert section in text, section
    assert list(tmp_path.glob("realsize*.md")), "the Markdown table is written beside the JSON"

"""The CI guard itself: scripts/portability-guard.sh must hand its pytest arguments to each pass.

A guard that silently runs nothing (or runs pytest on the wrong arguments) would make CI red for the wrong reason, or
green without checking anything; this runs it on one small test file and checks that every pass ran that file.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_guard_runs_the_given_tests_under_every_pass():
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "portability-guard.sh"), sys.executable, "tests/test_registry.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    passes = out.count("== portability pass:")
    assert passes >= 1, out
    assert "no tests ran" not in out and "not found" not in out, out
    assert out.count(" passed") == passes, out

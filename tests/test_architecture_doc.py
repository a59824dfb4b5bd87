"""docs/architecture.md's file-by-file count of a training step is what the code does now: the output it shows of
`python scripts/step_files.py` (one traced LoRA step of stories260K on one process, then a save) is that command's
output. A change that makes a step cross other files updates the page with it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def shown_trace() -> str:
    page = (REPO_ROOT / "docs" / "architecture.md").read_text()
    match = re.search(r"Its output now:\n\n```text\n(?P<trace>.*?)```", page, re.S)
    assert match, "docs/architecture.md shows no output of scripts/step_files.py"
    return match["trace"]


def test_the_page_shows_the_files_a_step_really_crosses():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "scripts/step_files.py"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == shown_trace(), "rerun: python scripts/step_files.py, and update docs/architecture.md"
    core = done.stdout.split("bookkeeping:")[0]
    assert "automodel/training/loss.py" in core and "automodel/models/forward_plan.py" not in core, (
        "the forward plan is decided once in setup, not in the step")

"""The guides cannot rot: every ```bash and ```python block in docs/guides/llm/*.md runs, in order, here.

A block must be preceded by a marker line:
  <!-- docs-check -->                    run it; it must exit 0
  <!-- docs-check: offline-error -->     run it offline (HF_HUB_OFFLINE=1, a fake token): it must fail with one
                                         `error:` line mentioning "offline" (the Hub is never contacted here)
The blocks of one guide share a working folder (so the checkpoint a fine-tune writes is there for the next
commands) with `examples/` linked in. Fine-tunes get tiny overrides and evaluations a small --limit, so the
commands shown are the real ones while the test stays short.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ASSETS, REPO_ROOT

# The two guides whose every command is checked (distributed.md and datasets.md show commands for other machines).
GUIDES = [REPO_ROOT / "docs" / "guides" / "llm" / name for name in ("peft.md", "sft.md")]
BLOCK = re.compile(r"^(<!-- docs-check(?::\s*(?P<mode>[\w-]+))? -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)^```",
                   re.M | re.S)
TINY_FINETUNE = ("--step_scheduler.max_steps 2 --step_scheduler.global_batch_size 4 --step_scheduler.local_batch_size 2 "
                 "--step_scheduler.val_every_steps 2 --step_scheduler.ckpt_every_steps 2 "
                 "--dataset.limit_dataset_samples 8 --validation_dataset.limit_dataset_samples 4 "
                 "--logging.progress_bar false")
SMALL_EVAL = "--limit 4"


def blocks(guide):
    return [(m["mode"] or ("run" if m.group(1) else None), m["lang"], m["body"])
            for m in BLOCK.finditer(guide.read_text())]


def shrink(script: str) -> str:
    """Tiny overrides for the long-running commands (continuation lines joined first)."""
    lines = script.replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        if line.lstrip().startswith("automodel finetune llm"):
            line = f"{line} {TINY_FINETUNE}"
        elif line.lstrip().startswith("automodel eval squad"):
            line = f"{line} {SMALL_EVAL}"
        out.append(line)
    return "\n".join(out) + "\n"


def run_block(lang: str, body: str, cwd, env):
    if lang == "python":
        return subprocess.run([sys.executable, "-c", body], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
    prelude = f'set -eo pipefail\nautomodel() {{ "{sys.executable}" -m automodel "$@"; }}\n'
    return subprocess.run(["bash", "-c", prelude + shrink(body)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("guide", GUIDES, ids=[g.stem for g in GUIDES])
def test_every_block_is_marked(guide):
    unmarked = [body.splitlines()[0] for mode, _, body in blocks(guide) if mode is None]
    assert not unmarked, f"{guide.name}: blocks without a <!-- docs-check --> marker: {unmarked}"


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES, ids=[g.stem for g in GUIDES])
def test_guide_commands_run(guide, tmp_path):
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    env = {**os.environ, "AUTOMODEL_ASSETS": str(ASSETS), "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf")}
    for mode, lang, body in blocks(guide):
        if mode == "offline-error":
            out = run_block(lang, body, tmp_path, {**env, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_docsCheckFake"})
            err = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(err) == 1 and "offline" in err[0], f"{body}\n{out.stderr[-2000:]}"
            continue
        out = run_block(lang, body, tmp_path, env)
        assert out.returncode == 0, f"{guide.name} block failed:\n{body}\n--- stdout\n{out.stdout[-2000:]}" \
                                    f"\n--- stderr\n{out.stderr[-3000:]}"

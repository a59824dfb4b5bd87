"""The guides cannot rot: every ```bash and ```python block in docs/guides/llm/*.md runs, in order, here.

A block must be preceded by a marker line:
  <!-- docs-check -->                    run it; it must exit 0
  <!-- docs-check: offline-error -->     run it offline (HF_HUB_OFFLINE=1, a fake token): it must fail with one
                                         `error:` line mentioning "offline" (the Hub is never contacted here)
The blocks of one guide share a working folder (so the checkpoint a fine-tune writes is there for the next
commands) with `examples/` linked in. Fine-tunes get tiny overrides and evaluations a small --limit, so the
commands shown are the real ones while the test stays short. The `automodel` commands and Python blocks run in
forks of one interpreter per guide that imported torch and transformers once (tests/forked_cli.py); the offline
blocks, which change what huggingface_hub reads when it is imported, start a fresh `python -m automodel`.

The output a guide shows must have the shape of what its command prints now: every log-line kind (level and message
with numbers and paths blanked, a `|` line's field names), start-banner and summary heading and row name, and JSON
record's keys in a block after a command appears in that command's output. distributed.md and datasets.md show
runs this test does not repeat (several processes, other data); their blocks are held to the single-process LoRA
fine-tune's output, less the lines only those runs print (`ELSEWHERE`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import ASSETS, REPO_ROOT

FORKED_CLI = REPO_ROOT / "tests" / "forked_cli.py"

# The two guides whose every command is checked (distributed.md and datasets.md show commands for other machines).
GUIDES = [REPO_ROOT / "docs" / "guides" / "llm" / name for name in ("peft.md", "sft.md")]
BLOCK = re.compile(r"^(<!-- docs-check(?::\s*(?P<mode>[\w-]+))? -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)^```",
                   re.M | re.S)
TINY_FINETUNE = ("--step_scheduler.max_steps 2 --step_scheduler.global_batch_size 4 --step_scheduler.local_batch_size 2 "
                 "--step_scheduler.val_every_steps 2 --step_scheduler.ckpt_every_steps 2 "
                 "--dataset.limit_dataset_samples 8 --validation_dataset.limit_dataset_samples 4 "
                 "--logging.progress_bar false")
SMALL_EVAL = "--limit 4"
# Guides whose "real output" blocks show runs on other setups, and the log lines only those setups print (the
# launcher's, the process group's and the instruction data's; tests/test_distributed.py and tests/test_data_e2e.py
# assert those). Their other lines must be what the single-process LoRA fine-tune of peft.md prints.
# Lines that depend on what ran before on the machine, not on the command: the tokenized-data cache.
MACHINE_STATE = ("INFO tokenized data",)
OTHER_RUNS = [REPO_ROOT / "docs" / "guides" / "llm" / name for name in ("distributed.md", "datasets.md")]
ELSEWHERE = ("INFO launching", "INFO distributed:", "INFO instruction data", "INFO epoch", "WARNING ")
# ... and, exactly, an intermediate checkpoint's line (no `model/` yet): the runs here save only at their last step.
ELSEWHERE_EXACT = ("INFO saved checkpoint <path>",)
LOG_LINE = re.compile(r"^(?:\d\d:\d\d:\d\d )(?P<level>[A-Z]+) (?P<message>.*)$")
HEADING = re.compile(r"^── (?P<title>.+?) ─+$")
ROW = re.compile(r"^  (?P<name>\S(?:.*?\S)?)  +\S")


def blocks(guide):
    return [(m["mode"] or ("run" if m.group(1) else None), m["lang"], m["body"])
            for m in BLOCK.finditer(guide.read_text())]


def shown_outputs(guide) -> list[str | None]:
    """For each block of `blocks(guide)`, the ```text block right after it (the output it shows), or None."""
    text = guide.read_text()
    shown = []
    for match in BLOCK.finditer(text):
        after = re.match(r"\s*```text\n(.*?)^```", text[match.end():], re.M | re.S)
        shown.append(after[1] if after else None)
    return shown


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


def run_block(lang: str, body: str, cwd, env, server: str | None = None):
    """Run a block as a user would; with `server` (a tests/forked_cli.py socket), in a fork of that interpreter."""
    if lang == "python":
        command = [sys.executable, "-I", "-S", str(FORKED_CLI), "python", server, body] if server else \
            [sys.executable, "-c", body]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    automodel = (f'"{sys.executable}" -I -S "{FORKED_CLI}" run "{server}"' if server
                 else f'"{sys.executable}" -m automodel')
    prelude = f'set -eo pipefail\nautomodel() {{ {automodel} "$@"; }}\n'
    return subprocess.run(["bash", "-c", prelude + shrink(body)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@contextlib.contextmanager
def fork_server(env: dict) -> str:
    """A tests/forked_cli.py server started with the guide's environment; yields its socket's path."""
    with tempfile.TemporaryDirectory(prefix="docs-cli-") as folder:  # short: a socket path has a length limit
        path = os.path.join(folder, "cli.sock")
        server = subprocess.Popen([sys.executable, str(FORKED_CLI), "serve", path], env=env, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert server.stdout.readline().strip() == "ready", "the fork server did not start"
            yield path
        finally:
            server.kill()
            server.wait()


@pytest.mark.parametrize("guide", GUIDES, ids=[g.stem for g in GUIDES])
def test_every_block_is_marked(guide):
    unmarked = [body.splitlines()[0] for mode, _, body in blocks(guide) if mode is None]
    assert not unmarked, f"{guide.name}: blocks without a <!-- docs-check --> marker: {unmarked}"


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES, ids=[g.stem for g in GUIDES])
def test_guide_commands_run(guide, tmp_path):
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    env = {**os.environ, "AUTOMODEL_ASSETS": str(ASSETS), "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf")}
    finetune_output = ""
    with fork_server(env) as server:
        for (mode, lang, body), shown in zip(blocks(guide), shown_outputs(guide)):
            if mode == "offline-error":  # a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE on import
                out = run_block(lang, body, tmp_path, {**env, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_docsCheckFake"})
                err = out.stderr.strip().splitlines()
                assert out.returncode == 2 and len(err) == 1 and "offline" in err[0], f"{body}\n{out.stderr[-2000:]}"
                continue
            out = run_block(lang, body, tmp_path, env, server)
            assert out.returncode == 0, f"{guide.name} block failed:\n{body}\n--- stdout\n{out.stdout[-2000:]}" \
                                        f"\n--- stderr\n{out.stderr[-3000:]}"
            compare_shapes(guide, body, shown, out.stdout + out.stderr)
            if body.lstrip().startswith("automodel finetune llm"):
                finetune_output = out.stdout + out.stderr
    if guide.name == "peft.md":
        for other in OTHER_RUNS:
            for language, body in fenced_blocks(other.read_text()):
                if language in ("", "text"):
                    compare_shapes(other, "", body, finetune_output, ignore=ELSEWHERE)


def blank(text: str) -> str:
    """`text` with paths and numbers replaced by placeholders (they differ from run to run)."""
    text = re.sub(r"(?<![\w/])[\w.~-]*/[\w.~/-]*[\w.]/?(?=[\s),:]|$)",
                  lambda m: m[0] if re.fullmatch(r"[a-z]+/s|[\d./]+", m[0]) else "<path>", text)
    return re.sub(r"\d[\d,.:e+-]*", "#", text)


def field_names(text: str) -> list[str]:
    """The names of a `a 1 | b 2 | ...` line's fields (words that are not blanked numbers)."""
    return [" ".join(w for w in field.split() if not re.fullmatch(r"[#/.%x()]+", w)) for field in text.split(" | ")]


def shapes(text: str) -> set[tuple[str, ...]]:
    """What a block or an output shows, line by line: log-line kinds, banner headings and rows, the field names
    of `|` lines, JSON records' keys."""
    found = set()
    for line in text.splitlines():
        if match := LOG_LINE.match(line):
            message = blank(match["message"])
            found.add(("log", match["level"], *(field_names(message) if " | " in message else [message])))
        elif match := HEADING.match(line):
            found.add(("heading", blank(match["title"])))
        elif match := ROW.match(line):
            found.add(("row", match["name"]))
        elif " | " in line:
            found.add(("fields", *field_names(blank(line))))
        elif line.startswith("{") and line.endswith("}"):
            found.add(("json", *sorted(json.loads(line))))
    return found


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block of a guide."""
    found, language, body = [], None, []
    for line in text.splitlines():
        if language is None and line.startswith("```"):
            language, body = line[3:].strip(), []
        elif language is not None and line.startswith("```"):
            found.append((language, "\n".join(body)))
            language = None
        elif language is not None:
            body.append(line)
    return found


def compare_shapes(guide, command: str, shown: str | None, printed: str, ignore: tuple[str, ...] = ()) -> None:
    if shown is None:
        return
    missing = {s for s in shapes(shown) - shapes(printed)
               if not (s[0] == "log" and f"{s[1]} {s[2]}".startswith(MACHINE_STATE + ignore))
               and not (ignore and s[0] == "log" and len(s) == 3 and f"{s[1]} {s[2]}" in ELSEWHERE_EXACT)}
    assert not missing, (f"{guide.name}: the output shown {'after ' + command.splitlines()[0] if command else ''} "
                         f"has lines the command no longer prints: {sorted(missing)}\n--- printed\n{printed[-3000:]}")

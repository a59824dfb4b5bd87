"""The after-training commands' CLI surface: --help without torch, bad usage as one line with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from automodel.cli.main import main
from tests.conftest import REPO_ROOT

COMMANDS = [["generate"], ["eval", "squad"], ["merge-lora"], ["push"], ["serve"]]


def test_every_command_has_help_without_torch():
    code = ("import sys; from automodel.cli.main import main\n"
            f"for argv in {COMMANDS!r}:\n"
            "    try:\n        main(argv + ['--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    for usage in ("usage: automodel generate", "usage: automodel eval squad", "usage: automodel merge-lora",
                  "usage: automodel push", "usage: automodel serve"):
        assert usage in out.stdout
    top = subprocess.run([sys.executable, "-m", "automodel", "--help"], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=60)
    assert all(f"automodel {name}" in top.stdout for name in ("generate", "eval squad", "merge-lora", "push", "serve"))


@pytest.mark.parametrize("argv, message", [
    (["generate", "m"], "automodel generate: one of the arguments --prompt --prompts-file --squad is required"),
    (["generate", "m", "--prompt", "a", "--squad", "b"], "argument --squad: not allowed with argument --prompt"),
    (["eval", "bleu", "m"], "automodel eval: unknown benchmark 'bleu'; known: squad"),
    (["merge-lora", "m"], "the following arguments are required: -o/--output"),
    (["push", "m"], "the following arguments are required: --repo-id"),
    (["serve", "./no/such/dir", "-o", "x"], "model: not found: ./no/such/dir"),
    (["generate", "./no/such/dir", "--prompt", "hi"], "model: not found: ./no/such/dir"),
    (["generat"], "unknown command 'generat' (did you mean 'generate'?)"),
])
def test_bad_usage_is_one_line_exit_2(argv, message, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_model_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["merge-lora", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path} holds neither config.json (a model) nor adapter_config.json (a LoRA adapter)" in err


def test_merge_needs_an_adapter(capsys):
    from tests.conftest import STORIES

    assert main(["merge-lora", str(STORIES), "-o", "unused"]) == 2
    assert "is not a LoRA adapter or a LoRA checkpoint: nothing to merge" in capsys.readouterr().err

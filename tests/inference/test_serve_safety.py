"""`automodel serve` runs no code from the current directory, and asks clients for an API key when other machines
can reach the server."""

from __future__ import annotations

import stat
import sys

import pytest

from automodel.cli.main import main
from automodel.inference.vllm_runtime import (
    API_KEY_ENV,
    ServerSettings,
    VllmInstall,
    api_key_environment,
    find_vllm,
    is_loopback,
    project_vllm_python,
    server_command,
)
from tests.conftest import REPO_ROOT, STORIES


def planted_python(folder, planted):
    """An executable where `.venv-vllm/bin/python` would be, that writes FILE when anything runs it."""
    python = folder / ".venv-vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\nid > {planted}\nexit 1\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_serve_runs_no_interpreter_from_the_current_directory(tmp_path, monkeypatch, capsys):
    planted = tmp_path / "FILE"
    work = tmp_path / "someone_elses_checkout"
    python = planted_python(work, planted)
    monkeypatch.chdir(work)
    monkeypatch.delenv("AUTOMODEL_VLLM_PYTHON", raising=False)
    assert main(["serve", str(STORIES), "--output", str(tmp_path / "serve")]) == 0
    printed = capsys.readouterr().out
    assert not planted.exists(), "the current directory's interpreter ran"
    assert str(python) not in printed and " .venv-vllm/bin/python " not in printed
    install = find_vllm()
    assert install is None or install.python in (str(project_vllm_python()), sys.executable)
    assert project_vllm_python() == REPO_ROOT / ".venv-vllm" / "bin" / "python"


def test_the_server_starts_isolated_from_the_current_directory():
    command = server_command(VllmInstall("/venv/bin/python", True), ["--model", "m"], ServerSettings())
    assert command[:4] == ["/venv/bin/python", "-I", "-m", "vllm.entrypoints.openai.api_server"]


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.7", False), ("no-such-host.invalid", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_an_api_key_when_other_machines_can_connect():
    environ = {"PATH": "/bin"}
    same, note = api_key_environment(ServerSettings(host="127.0.0.1"), environ)
    assert same == environ and note is None

    env, note = api_key_environment(ServerSettings(host="0.0.0.0"), environ)
    key = env[API_KEY_ENV]
    assert len(key) >= 40 and API_KEY_ENV not in environ
    assert note.startswith("--host 0.0.0.0 accepts other machines: clients must send this API key, shown only now: ")
    assert note.count(key) == 1
    assert api_key_environment(ServerSettings(host="0.0.0.0"), environ)[0][API_KEY_ENV] != key  # a new one each run

    own = {**environ, API_KEY_ENV: "my-key"}
    env, note = api_key_environment(ServerSettings(host="0.0.0.0"), own)
    assert env == own and "my-key" not in note and f"${API_KEY_ENV}" in note

    env, note = api_key_environment(ServerSettings(host="0.0.0.0", extra_args=["--api-key", "k"]), environ)
    assert API_KEY_ENV not in env and "--vllm-args" in note


def test_printing_the_command_for_another_host_says_so(tmp_path, capsys):
    assert main(["serve", str(STORIES), "--output", str(tmp_path / "serve"), "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert f"note: --host 0.0.0.0 accepts other machines: set ${API_KEY_ENV} before starting the server" in out
    assert main(["serve", str(STORIES), "--output", str(tmp_path / "serve2")]) == 0
    assert "accepts other machines" not in capsys.readouterr().out

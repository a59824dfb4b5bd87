"""`_target_` resolves only inside trusted packages unless the user widens the list on purpose."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import yaml

from automodel.cli.main import main
from automodel.config import build, load_config, target_policy
from automodel.config.loader import load_yaml
from automodel.config.trust import ENV_VAR, find_targets
from automodel.errors import UserError
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_squad_config

PEFT_EXAMPLE = REPO_ROOT / "examples" / "llm_finetune" / "stories260K_squad_peft.yaml"


def _write(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_os_system_override_runs_nothing_and_exits_2_with_one_line(tmp_path):
    planted = tmp_path / "FILE"
    out = subprocess.run([sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(PEFT_EXAMPLE),
                          "--loss_fn._target_", "os.system", "--loss_fn.command", f"touch {planted}"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert not planted.exists(), "the target ran"
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: loss_fn._target_: 'os.system' is not in the trusted packages")
    assert "--allow-target" in lines[0]


def test_a_shared_yaml_cannot_run_a_target_hidden_deep_in_a_section(tmp_path, capsys):
    planted = tmp_path / "FILE"
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=1)
    cfg["dataset"]["tokenizer"] = {"_target_": "subprocess.run", "args": ["touch", str(planted)]}
    assert main(["finetune", "llm", "-c", str(_write(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: dataset.tokenizer._target_: 'subprocess.run' is not in the trusted packages "
                   f"({', '.join(target_policy(log=False).prefixes)}); if it is your own code, allow it with "
                   "--allow-target PREFIX (see docs/security.md)"]
    assert not planted.exists()


def test_build_refuses_before_importing(tmp_path):
    # Importing a module runs its code: an untrusted module is never imported, even to report that it is missing.
    with pytest.raises(UserError, match=r"x._target_: 'tests.helpers.tiny_squad_config' is not in the trusted"):
        build({"_target_": "tests.helpers.tiny_squad_config"}, "x")
    with pytest.raises(UserError, match=r"x._target_: 'torch.load' is not in the trusted"):
        build({"_target_": "torch.load", "f": str(tmp_path / "x.pt")}, "x")
    with pytest.raises(UserError, match=r"'torch.optimx.Thing' is not in the trusted"):  # prefix, not substring
        build({"_target_": "torch.optimx.Thing"}, "x")


def test_allow_target_flag_opts_in_with_a_warning(tmp_path, capsys):
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=1)
    cfg["loss_fn"] = {"_target_": "tests.faults.NaNOnCall", "call": 1}
    cfg["step_scheduler"]["no_such_key"] = 1  # the run stops at the next check, after the targets passed
    path = _write(tmp_path, cfg)
    assert main(["finetune", "llm", "-c", str(path)]) == 2
    assert "loss_fn._target_: 'tests.faults.NaNOnCall' is not in the trusted" in capsys.readouterr().err
    assert main(["finetune", "llm", "-c", str(path), "--allow-target", "tests.faults"]) == 2
    out = capsys.readouterr()
    assert out.err.strip().startswith("error: step_scheduler.no_such_key: unknown setting"), out.err
    warning = [line for line in out.out.splitlines() if "trusting config targets" in line]
    assert len(warning) == 1 and "tests.faults (from --allow-target)" in warning[0]


def test_env_var_and_config_key_opt_in_and_log_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="automodel"):
        policy = target_policy({"allow_targets": ["my_project.losses"]}, environ={ENV_VAR: "team_lib, other"})
    assert policy.prefixes[-3:] == ("team_lib", "other", "my_project.losses")
    policy.check("my_project.losses.Focal", "loss_fn")
    with pytest.raises(UserError, match="my_project.lossesx"):
        policy.check("my_project.lossesx.Focal", "loss_fn")
    [record] = caplog.records
    assert record.getMessage() == ("trusting config targets outside the defaults: team_lib (from "
                                   f"{ENV_VAR}), other (from {ENV_VAR}), my_project.losses (from allow_targets) "
                                   "(code in them runs as you)")


def test_a_config_file_cannot_allow_the_standard_library():
    for prefix in ("os", "subprocess.run", "builtins"):
        with pytest.raises(UserError, match=rf"allow_targets: '{re.escape(prefix)}' is in the Python standard "
                                            rf"library.*--allow-target {re.escape(prefix)}$"):
            target_policy({"allow_targets": [prefix]}, log=False)
    assert "os" in target_policy(cli=["os"], log=False).prefixes  # the person running the command may
    with pytest.raises(UserError, match=r"allow_targets: expected a list of package prefixes"):
        target_policy({"allow_targets": [1]}, log=False)


def test_every_shipped_recipe_uses_only_trusted_targets(monkeypatch):
    monkeypatch.setenv("AUTOMODEL_ASSETS", str(REPO_ROOT))
    yamls = sorted((REPO_ROOT / "examples").rglob("*.yaml")) + sorted((REPO_ROOT / "benchmarks").rglob("*.yaml"))
    assert len(yamls) >= 6
    policy = target_policy(log=False)
    for path in yamls:
        targets = list(find_targets(load_yaml(path)))
        assert targets, path
        policy.check_config(load_config(path))
    # docs/security.md shows how to allow targets of your own: every other page's targets work as they are.
    docs = [p for p in (REPO_ROOT / "docs").rglob("*.md") if p.name != "security.md"] + [REPO_ROOT / "README.md"]
    for doc in docs:
        for dotted in re.findall(r"_target_:\s*([\w.]+)", doc.read_text()):
            policy.check(dotted, doc.name)
    assert os.environ.get(ENV_VAR) is None

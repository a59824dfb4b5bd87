"""The switches that turn a check off come from the person running the command, not from the config file being
trusted (config/switches.py): issue 26's attacks with harmless payloads, and the ways the person grants them."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from automodel.cli.main import main
from automodel.config.switches import check_file_switches, load_person_config
from automodel.errors import UserError
from tests.conftest import STORIES
from tests.helpers import tiny_squad_config


def write(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def refused(tmp_path, capsys, cfg, *overrides) -> str:
    assert main(["finetune", "llm", "-c", write(tmp_path, cfg), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "ckpt").exists()
    return err[0]


def remote_code_model(tmp_path, planted):
    """stories260K whose config.json asks for the repo's own configuration class, which runs `id > FILE`."""
    folder = tmp_path / "remote_model"
    shutil.copytree(STORIES, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(
        f"import os\nos.system('id > {planted}')\nfrom transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    pass\n")
    return folder


def test_trust_remote_code_in_a_config_file_runs_nothing(tmp_path, capsys):
    planted = tmp_path / "FILE"
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    cfg["model"].update(pretrained_model_name_or_path=str(remote_code_model(tmp_path, planted)), trust_remote_code=True)
    path = write(tmp_path, cfg)
    line = refused(tmp_path, capsys, cfg)
    assert line == (f"error: model.trust_remote_code: {path} sets it to True, which turns a safety check off; a "
                    "config file cannot, only you can: pass --model.trust_remote_code true (see docs/security.md)")
    assert not planted.exists()


@pytest.mark.parametrize("dotted, value, grant", [
    ("checkpoint.trust_pickled_state", True, "--checkpoint.trust_pickled_state true"),
    ("tokenizer.trust_remote_code", "${oc.env:HOME}", "--tokenizer.trust_remote_code true"),
    ("dataset.tokenizer.weights_only", False, "--dataset.tokenizer.weights_only false"),
    ("loss_fn.allow_pickle", True, "--loss_fn.allow_pickle true"),
    ("model.trust_remote_code", 1, "--model.trust_remote_code true"),
])
def test_every_switch_in_a_file_stops_with_how_to_grant_it(tmp_path, capsys, dotted, value, grant):
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    node, parts = cfg, dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    line = refused(tmp_path, capsys, cfg)
    assert line.startswith(f"error: {dotted}: ") and f"only you can: pass {grant} (see docs/security.md)" in line


@pytest.mark.parametrize("prefixes", [["yaml"], ["setuptools"], ["torch"], ["my_project.losses"]])
def test_allow_targets_in_a_file_widens_nothing(tmp_path, capsys, prefixes):
    planted = tmp_path / "FILE"
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    cfg["allow_targets"] = prefixes
    cfg["loss_fn"] = {"_target_": "torch.load", "f": str(planted)}
    path = write(tmp_path, cfg)
    line = refused(tmp_path, capsys, cfg)
    assert line == (f"error: allow_targets: {path} widens the trusted packages to '{prefixes[0]}', which a config "
                    f"file cannot, only you can: pass --allow-target {prefixes[0]} (or set AUTOMODEL_ALLOW_TARGETS) "
                    "(see docs/security.md)")


def test_the_person_grants_on_the_command_line(tmp_path, monkeypatch):
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    cfg["model"]["trust_remote_code"] = True
    cfg["checkpoint"]["trust_pickled_state"] = True
    cfg["allow_targets"] = ["tests.faults"]
    path = write(tmp_path, cfg)
    with pytest.raises(UserError, match="^model.trust_remote_code: "):
        load_person_config(path, ["--checkpoint.trust_pickled_state", "true"], ["tests.faults"])
    granted = load_person_config(path, ["--model.trust_remote_code", "true", "--checkpoint.trust_pickled_state",
                                        "true"], ["tests.faults"])
    assert granted["model"]["trust_remote_code"] is True and granted["allow_targets"] == ["tests.faults"]
    # A section replaced as a whole by the person replaces the file's switch with it.
    replaced = load_person_config(path, ["--model", f"{{pretrained_model_name_or_path: {STORIES}}}",
                                         "--checkpoint.trust_pickled_state", "false"], ["tests.faults"])
    assert "trust_remote_code" not in replaced["model"]
    monkeypatch.setenv("AUTOMODEL_ALLOW_TARGETS", "tests.faults")  # the environment grants targets too
    assert load_person_config(path, ["--model.trust_remote_code", "false", "--checkpoint.trust_pickled_state",
                                     "false"])["allow_targets"] == ["tests.faults"]


def test_switches_that_keep_the_checks_on_pass():
    check_file_switches({"model": {"trust_remote_code": False}, "x": {"weights_only": True, "allow_pickle": False},
                         "checkpoint": {"trust_pickled_state": None}, "allow_targets": ["torch.optim"]},
                        "cfg.yaml", {"*": "-"})


def test_launched_workers_check_the_file_too(tmp_path, capsys):
    """--nproc-per-node checks the config once in the launcher, before any worker starts."""
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    cfg["checkpoint"]["trust_pickled_state"] = True
    line = refused(tmp_path, capsys, cfg, "--nproc-per-node", "2")
    assert line.startswith("error: checkpoint.trust_pickled_state: ")

"""A step's saved config.yaml is a config file too: export, generate, eval, merge-lora and serve obey its trust
switches only with their own flags (config/switches.py)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from automodel.cli.main import main
from tests.conftest import STORIES


def step_folder(tmp_path, model_dir, **model_settings):
    """A step folder as training writes it (model/, config.yaml, dcp/), its config.yaml edited by someone else."""
    step = tmp_path / "ckpt" / "step_1"
    shutil.copytree(model_dir, step / "model")
    (step / "dcp").mkdir()
    cfg = {"model": {"pretrained_model_name_or_path": str(STORIES), **model_settings},
           "dataset": {"_target_": "automodel.data.squad.make_squad_dataset"}}
    (step / "config.yaml").write_text(yaml.safe_dump(cfg))
    return step


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


COMMANDS = {
    "generate": lambda step, out: ["generate", str(step), "--prompt", "x", "--device", "cpu"],
    "eval": lambda step, out: ["eval", "squad", str(step), "--limit", "1", "--device", "cpu"],
    "merge-lora": lambda step, out: ["merge-lora", str(step), "--output", str(out)],
    "serve": lambda step, out: ["serve", str(step), "--output", str(out), "--merge"],
    "export": lambda step, out: ["export", str(step), "--output", str(out), "--trust-pickled-state"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_trust_remote_code_in_a_saved_config_needs_the_flag(fresh_adapter, tmp_path, capsys, command):
    step = step_folder(tmp_path, fresh_adapter, trust_remote_code=True)
    out = tmp_path / "out"
    assert main(COMMANDS[command](step, out)) == 2
    assert one_line(capsys) == (f"error: model.trust_remote_code: {step / 'config.yaml'} sets it to True, which turns "
                                "a safety check off; a config file cannot, only you can: pass --trust-remote-code "
                                "(see docs/security.md)")
    assert not out.exists()


def test_the_flag_grants_it(fresh_adapter, tmp_path, capsys):
    step = step_folder(tmp_path, fresh_adapter, trust_remote_code=True)
    assert main(["generate", str(step), "--prompt", "Paris is", "--max-new-tokens", "2", "--device", "cpu",
                 "--trust-remote-code"]) == 0
    assert main(["merge-lora", str(step), "--output", str(tmp_path / "merged"), "--trust-remote-code"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_export_widens_targets_only_with_the_flag(fresh_adapter, tmp_path, capsys):
    planted = tmp_path / "FILE"
    step = step_folder(tmp_path, fresh_adapter)
    cfg = yaml.safe_load((step / "config.yaml").read_text())
    cfg.update(allow_targets=["os"], loss_fn={"_target_": "os.system", "command": f"id > {planted}"})
    (step / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["export", str(step), "--output", str(tmp_path / "out"), "--trust-pickled-state"]) == 2
    assert one_line(capsys) == (f"error: allow_targets: {step / 'config.yaml'} widens the trusted packages to 'os', "
                                "which a config file cannot, only you can: pass --allow-target os (or set "
                                "AUTOMODEL_ALLOW_TARGETS) (see docs/security.md)")
    assert not planted.exists() and not (tmp_path / "out").exists()

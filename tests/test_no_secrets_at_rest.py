"""A secret given through `${oc.env:VAR}` is written nowhere: not in the saved configs, the trackers' files, the
checkpoints, the data cache, the log, nor the model card of a push dry-run."""

from __future__ import annotations

import pytest
import yaml

from automodel.checkpoint import check_compatible
from automodel.cli.main import main
from automodel.config import REDACTED, config_at_rest, is_secret_key
from automodel.errors import UserError
from tests.helpers import tiny_squad_config

SECRET = "planted-secret-7f3a9c71e2d04b8b"
VAR = "AUTOMODEL_TEST_PLANTED_TOKEN"


def files_holding(root, needle: bytes) -> list[str]:
    return [str(p) for p in sorted(root.rglob("*")) if p.is_file() and needle in p.read_bytes()]


def test_a_planted_secret_is_in_no_file_a_run_its_trackers_and_a_push_dry_run_write(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(VAR, SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)  # what a user with a token has set; nothing may copy it either
    monkeypatch.setenv("AUTOMODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=2, train_samples=8, global_batch=4, local_batch=4)
    cfg.pop("validation_dataset")
    cfg["dataset"]["seq_length"] = 128
    # The usual ways a token reaches a config: the hub download kwargs of the model and of the tokenizer.
    cfg["model"]["token"] = f"${{oc.env:{VAR}}}"
    cfg["tokenizer"] = {"pretrained_model_name_or_path": cfg["model"]["pretrained_model_name_or_path"],
                        "token": f"${{oc.env:{VAR}}}"}
    cfg["logging"].update(wandb={"mode": "offline", "dir": str(tmp_path / "wandb")}, mlflow={}, tensorboard={})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))

    assert main(["finetune", "llm", "-c", str(path), "--step_scheduler.ckpt_every_steps", "1"]) == 0
    ckpt = tmp_path / "ckpt"
    assert main(["push", str(ckpt), "--repo-id", "someone/tiny", "--dry-run"]) == 0
    out = capsys.readouterr()

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written) and (ckpt / "mlflow.db").is_file()
    assert list((ckpt / "tensorboard").rglob("events.out.tfevents.*"))
    assert (ckpt / "step_2" / "model" / "adapter_model.safetensors").is_file()
    assert files_holding(tmp_path, SECRET.encode()) == []
    assert SECRET not in out.out and SECRET not in out.err
    # The variable is named where the value would have been, so the saved config still says where it came from.
    saved = yaml.safe_load((ckpt / "step_2" / "config.yaml").read_text())
    assert saved["model"]["token"] == f"${{oc.env:{VAR}}}"
    assert f"token: ${{oc.env:{VAR}}}" in out.out  # the model card's training configuration



def test_resume_resolves_the_saved_expressions_again(tmp_path, monkeypatch):
    monkeypatch.setenv(VAR, SECRET)
    step = tmp_path / "step_3"
    step.mkdir()
    cfg = {"model": {"pretrained_model_name_or_path": "m", "token": f"${{oc.env:{VAR}}}"}, "seed": 1}
    (step / "config.yaml").write_text(yaml.safe_dump(config_at_rest(cfg)))
    check_compatible(step, {"model": {"pretrained_model_name_or_path": "m", "token": SECRET}, "seed": 1})
    with pytest.raises(UserError, match=r"trained with model.pretrained_model_name_or_path='m' but this config has 'n'"):
        check_compatible(step, {"model": {"pretrained_model_name_or_path": "n", "token": SECRET}, "seed": 1})
    monkeypatch.delenv(VAR)
    with pytest.raises(UserError, match=rf"{step / 'config.yaml'}: environment variable {VAR} is not set"):
        check_compatible(step, {"model": {"pretrained_model_name_or_path": "m"}, "seed": 1})


@pytest.mark.parametrize("key, secret", [
    ("token", True), ("hf_token", True), ("api_key", True), ("WANDB_API_KEY", True), ("db_password", True),
    ("client_secret", True), ("credentials", True), ("pad_token", False), ("eos_token", False),
    ("tokenizer", False), ("max_tokens", False), ("keep_last_n", False), ("answer_key", False)])
def test_secret_looking_keys(key, secret):
    assert is_secret_key(key) is secret


def test_literal_secrets_are_redacted_and_expressions_kept():
    at_rest = config_at_rest({"model": {"token": "hf_abc", "path": "x"},
                              "logging": {"wandb": {"api_key": "${oc.env:WANDB_API_KEY}"}},
                              "data": [{"password": "p"}], "tokenizer": {"pad_token": "<pad>"}})
    assert at_rest == {"model": {"token": REDACTED, "path": "x"},
                       "logging": {"wandb": {"api_key": "${oc.env:WANDB_API_KEY}"}},
                       "data": [{"password": REDACTED}], "tokenizer": {"pad_token": "<pad>"}}


def written_files(root) -> list:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]


def test_a_secret_in_every_interpolated_field_is_in_no_file_any_backend_writes(tmp_path, monkeypatch, capsys):
    """The model path, checkpoint dir, tokens, tracker run names, experiment and tags all come from the
    environment; every file the run, its trackers (wandb offline, MLflow, TensorBoard), metrics.jsonl, the adapter
    folder, the DCP state and the push dry-run's model card write is grepped for the value."""
    from tests.conftest import STORIES

    model_dir = tmp_path / f"models-{SECRET}"
    model_dir.symlink_to(STORIES, target_is_directory=True)
    env = {VAR: SECRET, "AUTOMODEL_TEST_MODEL": str(model_dir), "AUTOMODEL_TEST_CKPT": str(tmp_path / f"ckpt-{SECRET}"),
           "AUTOMODEL_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(tmp_path / "wandb")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=2, train_samples=8, global_batch=4, local_batch=4)
    cfg.pop("validation_dataset")
    cfg["dataset"]["seq_length"] = 128
    secret = f"${{oc.env:{VAR}}}"
    cfg["model"].update(pretrained_model_name_or_path="${oc.env:AUTOMODEL_TEST_MODEL}", token=secret)
    cfg["checkpoint"]["checkpoint_dir"] = "${oc.env:AUTOMODEL_TEST_CKPT}"
    cfg["logging"].update(
        wandb={"mode": "offline", "dir": str(tmp_path / "wandb"), "name": f"run-{secret}", "tags": [secret]},
        mlflow={"experiment": f"exp-{secret}", "run_name": secret, "tags": {"team": secret}},
        tensorboard={})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))

    assert main(["finetune", "llm", "-c", str(path), "--step_scheduler.ckpt_every_steps", "1"]) == 0
    ckpt = tmp_path / f"ckpt-{SECRET}"
    capsys.readouterr()
    assert main(["push", str(ckpt), "--repo-id", "someone/tiny", "--dry-run"]) == 0
    card = capsys.readouterr().out.split("\n", 1)[1]  # the first line names the local folder being pushed
    assert main(["export", str(ckpt / "step_1"), "--output", str(tmp_path / "exported")]) == 0

    written = written_files(tmp_path)
    kinds = {"wandb run": [p for p in written if p.suffix == ".wandb"], "mlflow store": [ckpt / "mlflow.db"],
             "tensorboard": list((ckpt / "tensorboard").rglob("events.out.tfevents.*")),
             "metrics": [ckpt / "metrics.jsonl"], "adapter config": [ckpt / "step_2/model/adapter_config.json"],
             "exported adapter": [tmp_path / "exported" / "adapter_config.json"],
             "dcp metadata": [ckpt / "step_2/dcp/.metadata"]}
    assert all(files and all(f.is_file() for f in files) for files in kinds.values()), kinds
    assert [str(p) for p in written if SECRET.encode() in p.read_bytes()] == []
    assert SECRET not in card and "base_model" in card
    adapter = __import__("json").loads((ckpt / "step_2/model/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "${oc.env:AUTOMODEL_TEST_MODEL}"
    # Our own commands resolve the recorded expression again, so the adapter still finds its base.
    from automodel.inference.sources import resolve_source
    assert resolve_source(str(ckpt / "step_2" / "model")).base == str(model_dir)


@pytest.mark.parametrize("key", ["model.pretrained_model_name_or_path", "step_scheduler.max_steps",
                                 "checkpoint.save_consolidated"])
def test_an_error_that_echoes_a_value_from_the_environment_names_the_variable(tmp_path, monkeypatch, capsys, key):
    monkeypatch.setenv(VAR, f"/nowhere/{SECRET}")
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    section, name = key.split(".")
    cfg[section][name] = f"${{oc.env:{VAR}}}"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "llm", "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and SECRET not in err[0] and f"${{oc.env:{VAR}}}" in err[0], err
    assert not (tmp_path / "ckpt").exists()

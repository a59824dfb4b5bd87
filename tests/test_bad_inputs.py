"""Malformed inputs found by benchmarks/faults.py (R2) that ended in a traceback, several lines or a silent run:
each now ends with exit 2 and one line naming the key, file or row."""

from __future__ import annotations

import pytest
import yaml

from automodel.cli.main import main
from automodel.distributed.env import read_launch_env
from automodel.errors import UserError
from tests.conftest import STORIES
from tests.helpers import tiny_squad_config


def run_cfg(tmp_path, capsys, cfg, *overrides) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    assert main(["finetune", "llm", "-c", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("step_*"))
    return err[0]


@pytest.mark.parametrize("section", ["model", "dataset", "optimizer", "logging", "loss_fn", "dataloader",
                                     "validation_dataset"])
def test_a_section_that_is_not_a_mapping(tmp_path, capsys, section):
    cfg = tiny_squad_config(tmp_path)
    cfg[section] = [1, 2]
    assert run_cfg(tmp_path, capsys, cfg) == f"error: {section}: expected a mapping of settings, got [1, 2]"


@pytest.mark.parametrize("overrides, message", [
    (["--seed", "random"], "error: seed: expected an integer, got 'random'"),
    (["--optimizer.lr", "abc"], "error: optimizer.lr: expected a value like the default 0.001, got 'abc'"),
    (["--dataset.dataset_name", "5"], "error: dataset.dataset_name: expected a value like the default "
                                      "'rajpurkar/squad', got 5"),
    (["--dataset.answer_only_loss", "maybe"], "error: dataset.answer_only_loss: expected a value like the default "
                                            "True, got 'maybe'"),
    (["--logging.metrics_file", "../../m.jsonl"], "error: logging.metrics_file: '../../m.jsonl' must be a plain "
                                                  "name"),
    (["--log-level", "LOUD"], "error: automodel: argument --log-level: invalid choice: 'LOUD'"),
])
def test_bad_values_name_their_key(tmp_path, capsys, overrides, message):
    assert run_cfg(tmp_path, capsys, tiny_squad_config(tmp_path), *overrides).startswith(message)


def test_a_binary_config_file(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"\x00\xff\xfe\x80binary")
    assert main(["finetune", "llm", "-c", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: not a UTF-8 text file; expected a YAML config"


@pytest.mark.parametrize("content, message", [
    ("", "data.jsonl: the file is empty; expected json rows"),
    ('{"instruction": "a", "output": "b"}\n{oops\n', "data.jsonl: cannot read it as json"),
])
def test_unreadable_instruction_files_are_one_line(tmp_path, capsys, content, message):
    (tmp_path / "data.jsonl").write_text(content)
    cfg = tiny_squad_config(tmp_path)
    cfg["dataset"] = {"_target_": "automodel.data.instruction.make_instruction_dataset",
                      "dataset_name": str(tmp_path / "data.jsonl"), "seq_length": 64}
    cfg.pop("validation_dataset")
    assert message in run_cfg(tmp_path, capsys, cfg)


def test_a_cache_folder_that_cannot_exist(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("AUTOMODEL_CACHE", str(tmp_path / "file"))
    cfg = tiny_squad_config(tmp_path)
    cfg.pop("validation_dataset")
    assert run_cfg(tmp_path, capsys, cfg) == (f"error: dataset.cache_dir / AUTOMODEL_CACHE: cannot create the cache "
                                              f"folder {tmp_path / 'file' / 'tokenized'}: Not a directory")


def test_a_rank_outside_the_job():
    with pytest.raises(UserError, match=r"RANK=3, WORLD_SIZE=1, LOCAL_RANK=0: expected 0 <= RANK < WORLD_SIZE"):
        read_launch_env({"RANK": "3", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})


def test_latest_naming_a_missing_step_does_not_start_over(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "LATEST").write_text("step_99\n")
    line = run_cfg(tmp_path, capsys, tiny_squad_config(tmp_path))
    assert line == (f"error: {tmp_path / 'ckpt' / 'LATEST'} names 'step_99', which is not a step folder there; fix "
                    "LATEST or set checkpoint.restore_from")


def test_restore_from_a_file(tmp_path, capsys):
    line = run_cfg(tmp_path, capsys, tiny_squad_config(tmp_path), "--checkpoint.restore_from",
                   str(STORIES / "config.json"))
    assert line == f"error: checkpoint.restore_from: {STORIES / 'config.json'} is a file; expected a step folder"


def test_damaged_weights_are_one_line(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (folder / name).write_bytes((STORIES / name).read_bytes())
    (folder / "model.safetensors").write_bytes((STORIES / "model.safetensors").read_bytes()[:1000])
    assert main(["generate", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model.pretrained_model_name_or_path: {folder}: damaged "
                                               "safetensors weights"), err

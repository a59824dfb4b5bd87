"""The command line: help without torch, the short form, and a one-line error with exit 2 for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from automodel.cli.main import main
from tests.conftest import REPO_ROOT, SQUAD_TRAIN
from tests.helpers import tiny_squad_config


def write_cfg(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_help_answers_without_importing_torch():
    code = ("import sys; from automodel.cli.main import main; "
            "rc = main(['--help']); main(['finetune', 'llm', '--help']); "
            "assert 'torch' not in sys.modules, 'help imported torch'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "automodel finetune llm -c CONFIG.yaml" in out.stdout
    for section in ("step_scheduler", "peft", "dataset", "optimizer", "checkpoint"):
        assert section in out.stdout


@pytest.mark.slow
def test_short_form_runs_the_recipe_named_in_the_yaml(tmp_path):
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=2, train_samples=16)
    path = write_cfg(tmp_path, cfg)
    out = subprocess.run([sys.executable, "-m", "automodel", str(path), "--step_scheduler.log_every_steps", "1",
                          "--validation_dataset.limit_dataset_samples=8"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 2/2 | loss" in out.stdout
    saved = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    assert saved["step_scheduler"]["log_every_steps"] == 1 and saved["validation_dataset"]["limit_dataset_samples"] == 8
    assert (tmp_path / "ckpt" / "step_2" / "model" / "adapter_model.safetensors").is_file()


def _bad(tmp_path, mutate):
    cfg = tiny_squad_config(tmp_path, peft=True, max_steps=1, train_samples=8)
    mutate(cfg)
    return write_cfg(tmp_path, cfg)


def _set(path, value):
    def mutate(cfg):
        node = cfg
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return mutate


def _squad_rows_missing_question(tmp_path):
    data = json.loads(SQUAD_TRAIN.read_text())
    paragraph = data["data"][0]["paragraphs"][0]
    del paragraph["qas"][1]["question"]
    path = tmp_path / "broken_squad.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [paragraph]}]}))
    return str(path)


@pytest.mark.parametrize("case, argv_extra, mutate, message", [
    ("unknown target", [], _set("dataset._target_", "automodel.data.squad.make_squad_datset"),
     r"dataset._target_: .*no attribute 'make_squad_datset' \(did you mean 'make_squad_dataset'\?\)"),
    ("override wrong type", ["--step_scheduler.max_steps", "abc"], None,
     r"step_scheduler.max_steps: expected int \| null, got 'abc'"),
    ("unknown section", ["--step_schedular.max_steps", "3"], None,
     r"unknown config section 'step_schedular' \(did you mean 'step_scheduler'\?\)"),
    ("unknown key", ["--step_scheduler.max_step", "3"], None,
     r"step_scheduler.max_step: unknown setting \(did you mean 'max_steps'\?\)"),
    ("missing dataset file", ["--dataset.dataset_name", "/nonexistent/squad.json"], None, r"/nonexistent/squad.json"),
    ("model path not found", ["--model.pretrained_model_name_or_path", "./no/such/model"], None,
     r"model.pretrained_model_name_or_path: folder not found: ./no/such/model"),
    ("zero LoRA matches", ["--peft.target_modules", "[query_key_value]"], None,
     r"peft.target_modules: \['query_key_value'\].*matched no linear module.*q_proj"),
    ("batch does not divide", ["--step_scheduler.global_batch_size", "6"], None,
     r"global_batch_size 6 is not a multiple of local_batch_size 4"),
    ("bad peft value", ["--peft.dim", "0"], None, r"peft: dim \(the LoRA rank\) must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, argv_extra, mutate, message):
    path = _bad(tmp_path, mutate or (lambda cfg: None))
    code, err = run_cli(["finetune", "llm", "-c", str(path), *argv_extra], capsys)
    assert code == 2, case
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert pytest.importorskip("re").search(message, err[0]), err[0]


def test_dataset_rows_missing_fields(tmp_path, capsys):
    bad_file = _squad_rows_missing_question(tmp_path)
    path = _bad(tmp_path, _set("dataset.dataset_name", bad_file))
    code, err = run_cli(["finetune", "llm", "-c", str(path)], capsys)
    assert code == 2 and len(err) == 1
    assert "broken_squad.json" in err[0] and "question" in err[0]


def test_missing_config_and_yaml_syntax(tmp_path, capsys):
    code, err = run_cli(["finetune", "llm", "-c", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and err == [f"error: config file not found: {tmp_path / 'nope.yaml'}"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  pretrained_model_name_or_path: [unclosed\n")
    code, err = run_cli([str(broken)], capsys)
    assert code == 2 and len(err) == 1 and "YAML syntax error in" in err[0] and "broken.yaml:" in err[0]


def test_unknown_command_and_recipe(tmp_path, capsys):
    code, err = run_cli(["finetune", "lm", "-c", "x.yaml"], capsys)
    assert code == 2 and "unknown command 'finetune lm'" in err[0] and "did you mean 'finetune llm'" in err[0]
    path = _bad(tmp_path, _set("recipe", "llm_finetun"))
    code, err = run_cli([str(path)], capsys)
    assert code == 2 and "unknown recipe 'llm_finetun' (did you mean 'llm_finetune'?)" in err[0]


def test_offline_hub_id_is_one_line(tmp_path):
    # The network is the one thing we may not reach here: HF_HUB_OFFLINE makes the hub client fail at once
    # (it is read when huggingface_hub is imported, hence a fresh process).
    path = _bad(tmp_path, _set("model.pretrained_model_name_or_path", "meta-llama/Llama-3.2-1B"))
    stories = tiny_squad_config(tmp_path)["model"]["pretrained_model_name_or_path"]
    out = subprocess.run([sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(path),
                          "--tokenizer.pretrained_model_name_or_path", stories],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "meta-llama/Llama-3.2-1B" in err[0] and "offline" in err[0] and "local folder" in err[0]

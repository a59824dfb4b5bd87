"""`automodel push` without a network: which files go, what the model card says, and one-line failures.

The Hub is never contacted: HF_HUB_OFFLINE=1 (read by huggingface_hub at import, hence subprocesses) or an
endpoint nothing listens on stands in for "offline"; a fake token makes the client try.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from automodel.errors import UserError
from automodel.inference.hub import model_card, plan_push, select_files
from automodel.inference.sources import resolve_source
from tests.conftest import REPO_ROOT, STORIES

FAKE_TOKEN = "hf_automodelTestTokenNeverPrinted0123"


def run_push(args, **env):
    full_env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, **env}
    return subprocess.run([sys.executable, "-m", "automodel", "push", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, env=full_env)


def test_file_selection_keeps_weights_configs_and_tokenizer_only(fresh_adapter):
    for junk in ("optimizer.pt", "training_args.bin", ".adapter_model.safetensors.tmp", "notes.log", "README.md"):
        (fresh_adapter / junk).write_text("x")
    (fresh_adapter / "sub").mkdir()
    files = select_files(fresh_adapter)
    assert files == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no .safetensors weights"):
        select_files(tmp_path)


def test_model_card_metadata_and_body(fresh_adapter):
    # A run on hub ids: the card names the base model and the dataset in its metadata.
    config = {"model": {"pretrained_model_name_or_path": "meta-llama/Llama-3.2-1B"},
              "peft": {"dim": 8, "alpha": 32, "target_modules": "all-linear"},
              "dataset": {"dataset_name": "rajpurkar/squad"}, "validation_dataset": {"dataset_name": "/data/dev.json"}}
    source = resolve_source(str(fresh_adapter))
    source.base, source.train_config = "meta-llama/Llama-3.2-1B", config
    source.metrics = [{"kind": "train", "step": 10, "loss": 1.25}, {"kind": "validation", "step": 10, "val_loss": 1.5}]
    card = model_card(source, "me/llama-squad", scores={"version": "1.1", "total": 50, "dataset": "/d/dev.json",
                                                        "exact_match": 12.0, "f1": 20.5})
    meta = yaml.safe_load(card.split("---")[1])
    assert meta == {"base_model": "meta-llama/Llama-3.2-1B", "datasets": ["rajpurkar/squad"], "library_name": "peft",
                    "pipeline_tag": "text-generation", "tags": ["automodel", "lora", "text-generation"]}
    assert "# llama-squad" in card and "rank 8, alpha 32" in card
    assert "| training loss | 1.2500 | 10 |" in card and "| validation loss | 1.5000 | 10 |" in card
    assert "exact match 12.00, F1 20.50" in card
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == config  # the training config, verbatim
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/llama-squad")' in card


@pytest.mark.slow
def test_card_of_a_real_checkpoint(lora_run):
    plan = plan_push(resolve_source(str(lora_run)), "me/stories-squad")
    assert plan.folder == lora_run / "step_20" / "model"
    assert "adapter_model.safetensors" in plan.files
    meta = yaml.safe_load(plan.card.split("---")[1])
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local base path is not a Hub id
    metrics = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    last_train = [m for m in metrics if m["kind"] == "train"][-1]
    assert f"| training loss | {last_train['loss']:.4f} | 20 |" in plan.card
    assert "max_steps: 20" in plan.card


def test_offline_is_one_line_and_not_success(fresh_adapter):
    out = run_push([fresh_adapter, "--repo-id", "me/model"], HF_HUB_OFFLINE="1")
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "cannot push to me/model" in err[0] and "offline" in err[0] and "nothing was uploaded" in err[0]
    assert "pushed" not in out.stdout and FAKE_TOKEN not in out.stdout + out.stderr


def test_unreachable_endpoint_is_one_line(fresh_adapter):
    out = run_push([fresh_adapter, "--repo-id", "me/model", "--private"], HF_ENDPOINT="http://127.0.0.1:9")
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "unreachable" in err[0] and "pushed" not in out.stdout and FAKE_TOKEN not in out.stdout + out.stderr


def test_no_token_and_bad_repo_id(fresh_adapter, tmp_path):
    out = run_push([fresh_adapter, "--repo-id", "me/model"], HF_TOKEN="", HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)")
    out = run_push([fresh_adapter, "--repo-id", "not a repo id"])
    assert out.returncode == 2 and "--repo-id: 'not a repo id' is not a valid Hub repo id" in out.stderr


def test_dry_run_prints_files_and_card(fresh_adapter):
    out = run_push([fresh_adapter, "--repo-id", "me/model", "--dry-run"], HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("would upload to me/model: adapter_config.json, adapter_model.safetensors, ")
    assert "library_name: peft" in out.stdout and str(STORIES) in out.stdout

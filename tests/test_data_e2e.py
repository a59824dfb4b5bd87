"""Each data format trains a few real steps of stories260K through the recipe, from the example configs."""

from __future__ import annotations

import copy
import json
import math

import pytest
from transformers import AutoTokenizer

from automodel.config import load_config
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import ASSETS, REPO_ROOT, SQUAD_TRAIN

pytestmark = pytest.mark.slow
EXAMPLES = REPO_ROOT / "examples" / "llm_finetune"
SHORT_RUN = ["--step_scheduler.max_steps", "3", "--step_scheduler.global_batch_size", "4",
             "--step_scheduler.local_batch_size", "2", "--step_scheduler.ckpt_every_steps", "3"]


def run(cfg):
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    result = recipe.train()
    assert result.steps == 3 and all(math.isfinite(loss) for loss in result.train_losses)
    return recipe, result


def masked_prefix_then_labels(item):
    """Answer-only loss: a run of -100 first, then labels equal to the input ids."""
    labels, ids = item["labels"], item["input_ids"]
    first = next(i for i, label in enumerate(labels) if label != -100)
    return first > 0 and labels[first:] == ids[first:]


def test_alpaca_example_config_trains(tmp_path):
    cfg = load_config(EXAMPLES / "stories260K_alpaca_peft.yaml", SHORT_RUN + [
        "--dataset.limit_dataset_samples", "24", f"--dataset.cache_dir={tmp_path / 'cache'}",
        f"--checkpoint.checkpoint_dir={tmp_path / 'run'}"])
    recipe, result = run(cfg)
    rows = json.loads((ASSETS / "instruct" / "alpaca_en_demo.json").read_text())
    outputs = [row["output"].strip() for row in rows[:24]]
    assert 12 < len(recipe.parts.data.train_set) < 24  # the longest records do not fit seq_length 512 and are dropped
    for item in recipe.parts.data.train_set:
        assert masked_prefix_then_labels(item) and item["labels"][-1] == recipe.parts.tokenizer.eos_token_id
        assert recipe.parts.tokenizer.decode([t for t in item["labels"] if t != -100][:-1]).strip() in outputs
    assert (result.final_dir / "model" / "adapter_model.safetensors").is_file()


def test_chat_example_with_packing_trains_and_saves_its_template(tmp_path):
    rows = json.loads((ASSETS / "instruct" / "alpaca_en_demo.json").read_text())[:40]
    chats = [{"messages": [{"role": "user", "content": row["instruction"] + " " + row["input"]},
                           {"role": "assistant", "content": row["output"]}]} for row in rows]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    cfg = load_config(EXAMPLES / "stories260K_chat_packed_sft.yaml", SHORT_RUN + [
        f"--dataset.dataset_name={tmp_path / 'chat.jsonl'}", f"--dataset.cache_dir={tmp_path / 'cache'}",
        f"--checkpoint.checkpoint_dir={tmp_path / 'run'}"])
    recipe, result = run(cfg)
    batch = next(iter(recipe.parts.data.train_loader))
    assert batch["attention_mask"].dim() == 4 and batch["input_ids"].shape[0] <= 2
    answers = {row["output"].strip() + "<|im_end|>" for row in rows}
    for i in range(5):
        labels = recipe.parts.data.train_set[i]["labels"]
        assert labels[0] == -100 and labels[-1] == -100  # the user turn and the newline after <|im_end|>
        assert recipe.parts.tokenizer.decode([t for t in labels if t != -100]).strip() in answers
    saved = AutoTokenizer.from_pretrained(result.final_dir / "model")
    assert saved.chat_template == cfg["dataset"]["tokenizer"]["chat_template"]
    messages = chats[0]["messages"]
    assert saved.apply_chat_template(messages, tokenize=False) == recipe.parts.tokenizer.apply_chat_template(
        messages, tokenize=False)


def test_squad_v2_rows_train_with_the_unanswerable_target(tmp_path):
    nested = json.loads(SQUAD_TRAIN.read_text())
    v2 = {"version": "v2.0", "data": copy.deepcopy(nested["data"][:1])}
    for paragraph in v2["data"][0]["paragraphs"][:4]:
        for qa in paragraph["qas"][::2]:
            qa.update(is_impossible=True, plausible_answers=qa["answers"], answers=[])
    (tmp_path / "train-v2.0.json").write_text(json.dumps(v2))
    cfg = load_config(EXAMPLES / "stories260K_squad_peft.yaml", SHORT_RUN + [
        f"--dataset.dataset_name={tmp_path / 'train-v2.0.json'}", "--dataset.limit_dataset_samples", "20",
        "--dataset.unanswerable_target", "no answer", f"--dataset.cache_dir={tmp_path / 'cache'}",
        "--validation_dataset", "null", f"--checkpoint.checkpoint_dir={tmp_path / 'run'}"])
    recipe, _ = run(cfg)
    targets = [example["target"] for example in recipe.parts.data.train_set.examples]
    assert targets.count("no answer") >= 5 and len(set(targets)) > 5
    for item, example in zip(recipe.parts.data.train_set, recipe.parts.data.train_set.examples):
        labelled = [t for t in item["labels"] if t != -100][:-1]
        assert recipe.parts.tokenizer.decode(labelled).strip() == example["target"]


def test_dataset_tokenizer_override_is_used_and_saved(tmp_path):
    cfg = load_config(EXAMPLES / "stories260K_alpaca_peft.yaml", SHORT_RUN + [
        "--dataset.limit_dataset_samples", "12", f"--dataset.cache_dir={tmp_path / 'cache'}",
        "--dataset.tokenizer", "{add_bos: false, add_eos: true, padding_side: left}",
        f"--checkpoint.checkpoint_dir={tmp_path / 'run'}"])
    recipe, result = run(cfg)
    assert all(item["input_ids"][0] != recipe.parts.tokenizer.bos_token_id for item in recipe.parts.data.train_set)
    saved = AutoTokenizer.from_pretrained(result.final_dir / "model")
    assert saved.padding_side == "left" and saved("Once upon a time")["input_ids"] == \
        recipe.parts.tokenizer("Once upon a time")["input_ids"]
    assert saved("Once upon a time")["input_ids"][-1] == saved.eos_token_id


def test_alpaca_example_config_streams(tmp_path):
    """The README's way: the Alpaca example with `--dataset.streaming true` reads the file as training goes."""
    cfg = load_config(EXAMPLES / "stories260K_alpaca_peft.yaml", SHORT_RUN + [
        "--dataset.streaming", "true", "--dataset.limit_dataset_samples", "24",
        f"--checkpoint.checkpoint_dir={tmp_path / 'run'}"])
    recipe, result = run(cfg)
    assert recipe.parts.data.streaming and recipe.parts.data.steps_per_epoch is None
    assert (result.final_dir / "model" / "adapter_model.safetensors").is_file()

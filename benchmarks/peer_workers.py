"""One contender of benchmarks/peers.py, run in its own process: train the work unit once, report JSON.

Every contender gets the same model folder, the same tokenized rows (automodel's SQuAD builder, cached) in the
same order (no shuffling), global batch 8, AdamW (lr 1e-4, no weight decay), constant lr, grad-norm clip 1.0.
Only the training loop is timed (model loading and tokenizing are not).
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BATCH = 8
LR = 1e-4
MAX_GRAD_NORM = 1.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 8, 32


@dataclass(frozen=True)
class Work:
    """What one contender trains: the same for every contender of a scenario."""

    model_dir: str
    squad: str
    rows: int
    seq_length: int
    lora: bool
    out: str
    batch: int = BATCH
    bf16: bool = False  # bf16 weights on a GPU (benchmarks/gpu_peers.py); fp32 on the CPU


def dataset_args(squad: str, rows: int, seq_length: int) -> dict:
    return {"_target_": "automodel.data.squad.make_squad_dataset", "dataset_name": squad, "split": "train",
            "seq_length": seq_length, "limit_dataset_samples": rows}


def load_items(work: Work) -> tuple[object, list[dict]]:
    from automodel.data.squad import make_squad_dataset
    from automodel.models import load_tokenizer

    tokenizer = load_tokenizer(work.model_dir)
    args = {k: v for k, v in dataset_args(work.squad, work.rows, work.seq_length).items() if k != "_target_"}
    dataset = make_squad_dataset(tokenizer, **args)
    return tokenizer, [dataset[i] for i in range(len(dataset))]


def batch_counts(loader) -> dict:
    """Real tokens, label tokens (after the shift) and computed positions of one pass over a contender's loader."""
    real = labels = positions = squares = 0
    for batch in loader:
        mask = batch.get("padding_mask", batch["attention_mask"])
        real += int(mask.sum())
        squares += int((mask.sum(dim=1) ** 2).sum())  # attention FLOPs (per packed row when packed)
        labels += int((batch["labels"][:, 1:] != -100).sum())
        positions += batch["input_ids"].numel()
    return {"real_tokens": real, "label_tokens": labels, "positions": positions, "sum_squared_lengths": squares}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Timer:
    """Wall and CPU seconds of the timed region. On a shared machine the CPU seconds (this process's, all its
    threads) are the steadier measure of the work: the wall time also holds the waits for other processes."""

    def __enter__(self):
        synchronize()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        synchronize()
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def report(counts: dict, timer: Timer, losses: list[float]) -> dict:
    result = {**counts, "seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds, "losses": losses,
              "peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- automodel ------------------------------------------------------------------------------------

def automodel_config(work: Work, variant: str) -> dict:
    cfg = {
        "seed": 42,
        # attn_implementation unset: the library's default (automodel_sdpa where transformers picks sdpa).
        # precision unset: the library's default (auto: bf16 where the device computes it natively).
        "model": {"pretrained_model_name_or_path": work.model_dir, **({"dtype": "bfloat16"} if work.bf16 else {})},
        "dataset": dataset_args(work.squad, work.rows, work.seq_length),
        "dataloader": {"shuffle": False},
        "step_scheduler": {"global_batch_size": work.batch, "local_batch_size": work.batch, "num_epochs": 1},
        "optimizer": {"lr": LR, "weight_decay": 0.0},
        "lr_scheduler": {"decay": "constant"},
        "clip_grad_norm": {"max_norm": MAX_GRAD_NORM},
        "checkpoint": {"enabled": False, "checkpoint_dir": work.out},
        # The end-of-run metrics plot (~3 s of matplotlib) is not training and no peer draws one: off, so the timed
        # region holds the training loop only, as for the peers.
        "logging": {"progress_bar": False, "plot": False},
    }
    if work.lora:
        cfg["peft"] = {"dim": LORA_RANK, "alpha": LORA_ALPHA, "target_modules": LORA_TARGETS}
    if variant == "padded":  # the peers' padded batches (same loss as theirs), still automodel_sdpa
        cfg["packed_sequence"] = {"padding_free": False}
    elif variant == "sdpa":  # padded batches on transformers' own sdpa: the attention the peers run
        cfg["model"]["attn_implementation"] = "sdpa"
        cfg["packed_sequence"] = {"padding_free": False}
    elif variant == "grouped":
        cfg["dataloader"]["group_by_length"] = True
        cfg["packed_sequence"] = {"padding_free": False}
    elif variant.startswith("packed"):
        cfg["packed_sequence"] = {"packed_sequence_size": int(variant.removeprefix("packed"))}
    elif variant == "unchunked":  # logits at the label positions in one piece (logits_to_keep), no chunked head
        cfg["loss_fn"] = {"chunk_size": None}
    elif variant == "fp32":  # the library before bf16 became the default where the CPU has it
        cfg["precision"] = "fp32"
    elif variant in ("adamw-foreach", "adamw-fused"):  # the default on CPU is AdamW's per-tensor loop
        cfg["optimizer"][variant.removeprefix("adamw-")] = True
    elif variant != "default":
        raise ValueError(f"unknown automodel variant {variant!r}")
    return cfg


def run_automodel(work: Work, variant: str) -> dict:
    from automodel.training.recipe import FinetuneRecipe

    recipe = FinetuneRecipe(automodel_config(work, variant))
    recipe.setup()
    recipe.parts.data.train_loader.sampler.set_epoch(0)
    counts = batch_counts(recipe.parts.data.train_loader)
    with Timer() as timer:
        result = recipe.train()
    return report(counts, timer, result.train_losses)


# ---- HF Trainer and TRL ---------------------------------------------------------------------------

def peer_model(work: Work):
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(work.model_dir, dtype=torch.bfloat16 if work.bf16 else torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    return model, (lora_config() if work.lora else None)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")


def in_order(trainer_class):
    """The trainer with its shuffling sampler replaced by the rows' order (the same order every contender uses)."""

    class InOrder(trainer_class):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return InOrder


def common_args(work: Work, autocast_bf16: bool = False) -> dict:
    """`autocast_bf16`: the Trainer's `bf16=True` on float32 weights, its mixed precision (autocast, also on a CPU)."""
    return dict(output_dir=work.out, per_device_train_batch_size=work.batch, num_train_epochs=1, learning_rate=LR,
                lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch", max_grad_norm=MAX_GRAD_NORM,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
                bf16=work.bf16 or autocast_bf16, seed=42, dataloader_drop_last=True, disable_tqdm=True)


def train_peer(trainer) -> dict:
    counts = batch_counts(trainer.get_train_dataloader())
    with Timer() as timer:
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return report(counts, timer, losses)


def run_hf_trainer(work: Work, autocast_bf16: bool = False) -> dict:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer, items = load_items(work)
    model, peft_config = peer_model(work)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    trainer = in_order(Trainer)(
        model=model, args=TrainingArguments(**common_args(work, autocast_bf16)), train_dataset=Dataset.from_list(items),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    return train_peer(trainer)


def run_trl(work: Work, packing: bool) -> dict:
    """TRL's SFTTrainer on the same rows, pre-tokenized as prompt-completion (`completion_mask` = answer + EOS)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, items = load_items(work)
    rows_tok = [{"input_ids": it["input_ids"], "completion_mask": [int(l != -100) for l in it["labels"]]}
                for it in items]
    model, peft_config = peer_model(work)
    config = SFTConfig(**common_args(work), max_length=work.seq_length, completion_only_loss=True, packing=packing,
                       dataset_num_proc=None)
    trainer = in_order(SFTTrainer)(model=model, args=config, train_dataset=Dataset.from_list(rows_tok),
                                   processing_class=tokenizer, peft_config=peft_config)
    return train_peer(trainer)


def run_worker(contender: str, work: Work, threads: int) -> None:
    torch.set_num_threads(threads)
    Path(work.out).mkdir(parents=True, exist_ok=True)
    if contender.startswith("automodel"):
        result = run_automodel(work, contender.partition(":")[2] or "default")
    elif contender in ("hf-trainer", "hf-trainer:bf16"):
        result = run_hf_trainer(work, autocast_bf16=contender == "hf-trainer:bf16")
    elif contender in ("trl", "trl-packing"):
        result = run_trl(work, packing=contender == "trl-packing")
    else:
        raise ValueError(f"unknown contender {contender!r}")
    print("RESULT " + json.dumps(result), flush=True)

"""The fine-tuning recipe: config -> model -> data -> step -> checkpoint, as one readable loop.

`FinetuneRecipe(cfg).run()` is what `automodel finetune llm -c cfg.yaml` does. Each piece is built
by its own module (models/, peft/, data/, training/, checkpoint/); this file only wires them together
in the order a reader expects.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from automodel.checkpoint import CheckpointConfig, save_hf_model, save_step, write_config
from automodel.config import build, check_sections, parse_section
from automodel.data.collate import PadCollator
from automodel.errors import UserError
from automodel.logging import LoggingConfig, MetricsLogger
from automodel.models import load_tokenizer
from automodel.peft import LoraSettings, count_parameters
from automodel.training.loss import count_label_tokens
from automodel.training.lr_scheduler import LRSchedulerConfig
from automodel.training.step_scheduler import StepSchedulerConfig

logger = logging.getLogger("automodel")

DEFAULT_TARGETS = {
    "model": "automodel.models.load_causal_lm",
    "optimizer": "torch.optim.AdamW",
    "loss_fn": "automodel.training.loss.MaskedCrossEntropy",
    "dataloader": "torchdata.stateful_dataloader.StatefulDataLoader",
    "validation_dataloader": "torchdata.stateful_dataloader.StatefulDataLoader",
}


def with_default_target(cfg: dict, section: str) -> dict:
    node = dict(cfg.get(section) or {})
    node.setdefault("_target_", DEFAULT_TARGETS[section])
    return node


@dataclass
class RunResult:
    """What a finished run reports (the CLI prints it; tests assert on it)."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    final_dir: Path | None = None
    steps: int = 0


class FinetuneRecipe:
    """Fine-tune a causal LM with LoRA (when a `peft` section is present) or full SFT."""

    def __init__(self, cfg: dict[str, Any]):
        check_sections(cfg)
        self.cfg = cfg
        self.dp_size, self.dp_rank = 1, 0
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.steps = parse_section(StepSchedulerConfig, cfg.get("step_scheduler"), "step_scheduler")
        self.lr_cfg = parse_section(LRSchedulerConfig, cfg.get("lr_scheduler"), "lr_scheduler")
        self.ckpt_cfg = parse_section(CheckpointConfig, cfg.get("checkpoint"), "checkpoint")
        self.log_cfg = parse_section(LoggingConfig, cfg.get("logging"), "logging")
        self.peft_cfg = parse_section(LoraSettings, cfg["peft"], "peft") if cfg.get("peft") is not None else None
        self.clip_grad_norm = self._max_grad_norm(cfg.get("clip_grad_norm"))
        self.grad_acc = self.steps.grad_accumulation_steps(self.dp_size)
        if "dataset" not in cfg:
            raise UserError("config has no 'dataset' section: name a _target_ builder such as "
                            "automodel.data.squad.make_squad_dataset")

    @staticmethod
    def _max_grad_norm(node: Any) -> float | None:
        value = node.get("max_norm") if isinstance(node, dict) else node
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise UserError(f"clip_grad_norm.max_norm: expected a positive number or null, got {value!r}")
        return value

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        from transformers import set_seed

        set_seed(int(self.cfg.get("seed", 42)))
        self.tokenizer = self._build_tokenizer()
        self.model = self._build_model()
        self.train_set = self._build_dataset("dataset")
        self.val_set = self._build_dataset("validation_dataset") if self.cfg.get("validation_dataset") else None
        self.train_loader = self._build_loader(self.train_set, "dataloader", train=True)
        self.val_loader = self._build_loader(self.val_set, "validation_dataloader", train=False) \
            if self.val_set is not None else None
        self.steps_per_epoch = len(self.train_loader) // self.grad_acc
        self.max_steps, why = self.steps.total_steps(self.steps_per_epoch)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build(with_default_target(self.cfg, "optimizer"), "optimizer", params=self.params)
        self.lr_scheduler = self.lr_cfg.build(self.optimizer, self.max_steps)
        self.loss_fn = build(with_default_target(self.cfg, "loss_fn"), "loss_fn")
        self.out_dir = Path(self.ckpt_cfg.checkpoint_dir)
        write_config(self.cfg, self.out_dir / "config.yaml")
        self.metrics = MetricsLogger(self.out_dir / self.log_cfg.metrics_file)
        total, trainable = count_parameters(self.model)
        logger.info("model: %s parameters, %s trainable (%.2f%%), %s", f"{total:,}", f"{trainable:,}",
                    100 * trainable / total, "LoRA" if self.peft_cfg else "full SFT")
        logger.info("data: %d training examples, %d validation; %d micro-batches of %d per step "
                    "(global batch %d); %d steps: %s", len(self.train_set), len(self.val_set or []),
                    self.grad_acc, self.steps.local_batch_size, self.steps.global_batch_size, self.max_steps, why)

    def _build_tokenizer(self):
        # The tokenizer comes from the model unless `tokenizer:` or `dataset.tokenizer` names another.
        dataset = self.cfg.get("dataset") or {}
        node = self.cfg.get("tokenizer") or dataset.get("tokenizer")
        key = "tokenizer" if self.cfg.get("tokenizer") else "dataset.tokenizer"
        if node is None:
            node, key = {}, "model"
        if isinstance(node, str):
            node = {"pretrained_model_name_or_path": node}
        if "_target_" in node:
            return build(node, key)
        model_cfg = self.cfg.get("model") or {}
        source = node.get("pretrained_model_name_or_path", model_cfg.get("pretrained_model_name_or_path"))
        extra = {k: v for k, v in node.items() if k != "pretrained_model_name_or_path"}
        return load_tokenizer(source, trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
                              key=f"{key}.pretrained_model_name_or_path", **extra)

    def _build_model(self):
        model = build(with_default_target(self.cfg, "model"), "model")
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"model._target_ returned {type(model).__name__}, expected a torch.nn.Module")
        # No KV cache while training: it only costs memory.
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
        if self.peft_cfg is not None:
            model = self.peft_cfg.apply(model)
        return model.to(self.device)

    def _build_dataset(self, section: str):
        node = {k: v for k, v in self.cfg[section].items() if k != "tokenizer"}
        if "_target_" not in node:
            raise UserError(f"{section}._target_: missing; name a builder such as "
                            "automodel.data.squad.make_squad_dataset")
        dataset = build(node, section, tokenizer=self.tokenizer)
        if len(dataset) == 0:
            raise UserError(f"{section}: the dataset is empty after filtering")
        return dataset

    def _build_loader(self, dataset, section: str, train: bool):
        node = with_default_target(self.cfg, section)
        shuffle = bool(node.pop("shuffle", train))
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=self.dp_size, rank=self.dp_rank, shuffle=shuffle,
            seed=int(self.cfg.get("seed", 42)), drop_last=train)
        return build(node, section, dataset=dataset, batch_size=self.steps.local_batch_size, sampler=sampler,
                     collate_fn=PadCollator(self.tokenizer.pad_token_id), drop_last=train)

    # ---- training -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        self.setup()
        return self.train()

    def train(self) -> RunResult:
        result = RunResult()
        bar = tqdm(total=self.max_steps, desc="training", unit="step", dynamic_ncols=True,
                   disable=None if self.log_cfg.progress_bar else True)
        step, epoch = 0, 0
        with logging_redirect_tqdm():
            while step < self.max_steps:
                self.train_loader.sampler.set_epoch(epoch)
                batches = iter(self.train_loader)
                for _ in range(self.steps_per_epoch):
                    if step >= self.max_steps:
                        break
                    step += 1
                    record = self.train_step([next(batches) for _ in range(self.grad_acc)])
                    result.train_losses.append(record["loss"])
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", epoch=epoch)
                    self._after_step(step, epoch, record, result)
                epoch += 1
        bar.close()
        result.steps = step
        logger.info("done: %d steps in %s; final model in %s", step, f"{self.metrics.elapsed():.1f}s",
                    result.final_dir / "model" if result.final_dir else "(checkpointing disabled)")
        return result

    def _after_step(self, step: int, epoch: int, record: dict, result: RunResult) -> None:
        due = StepSchedulerConfig.due
        if step % self.steps.log_every_steps == 0 or step == self.max_steps:
            elapsed = self.metrics.elapsed()
            record.update(step=step, epoch=epoch, elapsed_s=elapsed,
                          eta_s=elapsed / step * (self.max_steps - step))
            self.metrics.log_train(record, self.max_steps)
        if self.val_loader is not None and due(self.steps.val_every_steps, step, self.max_steps):
            result.val_losses[step] = self.validate(step)
        if self.val_set is not None and self.steps.val_generate_every_steps and \
                due(self.steps.val_generate_every_steps, step, self.max_steps):
            from automodel.inference.squad_eval import squad_eval_during_training

            squad_eval_during_training(self.model, self.tokenizer, self.val_set, step, self.metrics)
        if self.ckpt_cfg.enabled and due(self.steps.ckpt_every_steps, step, self.max_steps):
            result.final_dir = self.save(step)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `grad_acc` micro-batches."""
        start = time.perf_counter()
        self.model.train()
        loss_sum, label_tokens = self.backward(micro_batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        seconds = time.perf_counter() - start
        return {"loss": loss_sum / max(label_tokens, 1), "grad_norm": float(grad_norm), "lr": lr,
                "tokens": tokens, "label_tokens": label_tokens, "tokens_per_s": tokens / seconds}

    def backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """Accumulate gradients of (summed loss / label tokens of the whole step): the gradient one batch holding
        all micro-batches would give. Returns (summed loss, label tokens)."""
        label_tokens = sum(count_label_tokens(b["labels"]) for b in micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            summed = self.forward_loss(batch)
            (summed / max(label_tokens, 1)).backward()
            loss_sum += summed.detach()
        return loss_sum.item(), label_tokens

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed masked cross-entropy of one micro-batch."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return self.loss_fn(logits, batch["labels"])

    @torch.no_grad()
    def validate(self, step: int) -> float:
        """Token-weighted validation loss over the whole validation set."""
        self.model.eval()
        loss_sum, tokens = 0.0, 0
        for batch in self.val_loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss_sum += self.forward_loss(batch).item()
            tokens += count_label_tokens(batch["labels"])
        val_loss = loss_sum / max(tokens, 1)
        self.metrics.log_validation(step, val_loss, tokens)
        return val_loss

    def save(self, step: int) -> Path:
        def write(folder: Path) -> None:
            save_hf_model(self.model, self.tokenizer, folder / "model")
            write_config(self.cfg, folder / "config.yaml")

        path = save_step(self.out_dir, step, write)
        logger.info("saved checkpoint %s", path)
        return path

"""What a recipe is told (`RecipeSettings`: every config section parsed and checked once, nothing built) and what it
holds once built (`RecipeParts`), the two lists a reader of automodel/training/recipe.py needs.

`RecipeSettings.from_config` is the one place the sections are read: the launcher calls it before starting workers
(so a typo fails once, not once per worker) and the recipe's constructor calls it before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from automodel.checkpoint import CheckpointConfig, check_no_links
from automodel.config import TargetPolicy, build, check_sections, check_targets, parse_section, target_policy
from automodel.distributed.config import DistEnvConfig, DistributedConfig
from automodel.errors import UserError
from automodel.logging import LoggingConfig
from automodel.models.build import lora_settings
from automodel.peft import LoraSettings
from automodel.training.kd_loss import KDLoss
from automodel.training.lr_scheduler import LRSchedulerConfig
from automodel.training.step_scheduler import StepSchedulerConfig

KD_SECTIONS = ("teacher_model", "kd_ratio", "kd_loss_fn")  # read by the llm_kd recipe only
KD_LOSS = "automodel.training.kd_loss.KDLoss"


@dataclass(frozen=True)
class KDSettings:
    """The kd recipe's own sections: `teacher_model` (a `model`-like section), `kd_ratio`, `kd_loss_fn`."""

    teacher: dict[str, Any]
    kd_ratio: float
    kd_loss: KDLoss

    @classmethod
    def from_config(cls, cfg: dict[str, Any], policy: TargetPolicy) -> KDSettings:
        ratio = cfg.get("kd_ratio", 0.5)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise UserError(f"kd_ratio: expected a number in [0, 1] (0: cross-entropy only, 1: KD only), got {ratio!r}")
        kd_loss = build({"_target_": KD_LOSS, **(cfg.get("kd_loss_fn") or {})}, "kd_loss_fn", policy=policy)
        if not isinstance(kd_loss, KDLoss):
            raise UserError(f"kd_loss_fn._target_: expected {KD_LOSS} (the chunked KD loss), got "
                            f"{cfg['kd_loss_fn'].get('_target_')!r}")
        return cls(teacher_section(cfg), float(ratio), kd_loss)


def teacher_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """`teacher_model`, checked (the run's `precision` decides the dtype it is built in: training/kd.py)."""
    node = cfg.get("teacher_model")
    if not node:
        raise UserError("teacher_model: the kd recipe needs a teacher: pretrained_model_name_or_path (a folder, hub "
                        "id, or a GGUF folder with gguf_file)")
    if "peft" in node:
        raise UserError("teacher_model.peft: the teacher is frozen and takes no adapter; a top-level `peft` "
                        "section trains the student with LoRA")
    return dict(node)


@dataclass(frozen=True)
class RecipeSettings:
    """Every section of a recipe config, parsed and checked; building the model and data reads `model`, `tokenizer`,
    `dataset`, `dataloader`, `loss_fn`, `optimizer` through their `_target_`s (whose packages `targets` allows)."""

    recipe: str
    seed: int
    targets: TargetPolicy
    steps: StepSchedulerConfig
    lr: LRSchedulerConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    distributed: DistributedConfig
    dist_env: DistEnvConfig
    peft: LoraSettings | None
    max_grad_norm: float | None
    kd: KDSettings | None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], recipe: str = "llm_finetune", allow_targets: tuple[str, ...] = (),
                    log: bool = True) -> RecipeSettings:
        check_sections(cfg)
        if recipe != "llm_kd":
            for name in KD_SECTIONS:
                if name in cfg:
                    raise UserError(f"{name}: only the knowledge-distillation recipe reads it (`automodel kd llm`, "
                                    "recipe: llm_kd)")
        # Every `_target_` is checked before anything is built or imported (config/trust.py).
        targets = target_policy(cfg, allow_targets, log=log)
        check_targets(cfg, targets)
        if "dataset" not in cfg:
            raise UserError("config has no 'dataset' section: name a _target_ builder such as "
                            "automodel.data.squad.make_squad_dataset")
        checkpoint = parse_section(CheckpointConfig, cfg.get("checkpoint"), "checkpoint")
        logging = parse_section(LoggingConfig, cfg.get("logging"), "logging")
        check_no_links(checkpoint.checkpoint_dir, (logging.metrics_file,))  # what the run writes follows no link
        return cls(
            recipe=recipe, seed=int(cfg.get("seed", 42)), targets=targets,
            steps=parse_section(StepSchedulerConfig, cfg.get("step_scheduler"), "step_scheduler"),
            lr=parse_section(LRSchedulerConfig, cfg.get("lr_scheduler"), "lr_scheduler"),
            checkpoint=checkpoint, logging=logging,
            distributed=parse_section(DistributedConfig, cfg.get("distributed"), "distributed"),
            dist_env=parse_section(DistEnvConfig, cfg.get("dist_env"), "dist_env"),
            peft=lora_settings(cfg),
            max_grad_norm=max_grad_norm(cfg.get("clip_grad_norm")),
            kd=KDSettings.from_config(cfg, targets) if recipe == "llm_kd" else None,
        )


def max_grad_norm(node: Any) -> float | None:
    value = node.get("max_norm") if isinstance(node, dict) else node
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise UserError(f"clip_grad_norm.max_norm: expected a positive number or null, got {value!r}")
    return value


@dataclass
class RunData:
    """The training and validation data of a run and how it is cut into steps."""

    train_set: Any
    train_loader: Any
    val_set: Any | None
    val_loader: Any | None
    streaming: bool
    steps_per_epoch: int | None  # None for a stream, which has no length
    max_steps: int
    steps_reason: str            # what decided max_steps, for the banner


@dataclass
class RecipeParts:
    """What a recipe holds once set up, each built once from its settings (FinetuneRecipe.setup)."""

    parallel: Any                # distributed/parallel.py's Parallelism: ranks, device, mesh, strategy
    tokenizer: Any
    model: torch.nn.Module       # the student: wrapped for the strategy, LoRA applied when `peft` is set
    forward_loss: Any            # one micro-batch -> (summed loss, label tokens): training/loss.py (or kd.py)
    data: RunData
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    grad_acc: int                # micro-batches per optimizer step on each rank
    metrics: Any                 # logging/metrics.py's MetricsLogger: console, metrics.jsonl, trackers
    throughput: Any              # logging/throughput.py: tokens/s, MFU, peak memory

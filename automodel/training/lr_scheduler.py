"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay down to `min_lr`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class LRSchedulerConfig:
    """The `lr_scheduler` section. `warmup_steps` wins over `warmup_ratio` when both are given."""

    decay: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.min_lr < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError("min_lr and warmup_steps must be >= 0")

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total_steps)
        factors = [self._factor_fn(group["lr"], warmup, total_steps) for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)

    def _factor_fn(self, base_lr: float, warmup: int, total: int):
        floor = min(self.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0

        def factor(step: int) -> float:
            # `step` counts finished optimizer steps: the lr for step 1 is factor(0).
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.decay == "constant" or total <= warmup:
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
            return floor + (1.0 - floor) * shape

        return factor

"""How many micro-batches make a step, how many steps make the run, and when to log, validate and save."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from automodel.errors import UserError


@dataclass
class StepSchedulerConfig:
    """The `step_scheduler` section.

    Gradient accumulation is derived: global_batch_size / (local_batch_size * data-parallel size).
    `max_steps` when given sets the run length; `num_epochs`, when set, bounds it (the log says which won).
    Neither set means one epoch. `on_nonfinite`: a NaN/inf loss or gradient norm stops the run (nothing new is
    saved) or skips that update.
    """

    global_batch_size: int = 8
    local_batch_size: int = 1
    max_steps: int | None = None
    num_epochs: int | None = None
    val_every_steps: int | None = None
    ckpt_every_steps: int | None = None
    log_every_steps: int = 1
    on_nonfinite: Literal["stop", "skip"] = "stop"
    val_generate_every_steps: int | None = None
    # Also score the validation set before the first step (step 0): the base model's validation loss and, with a
    # SQuAD validation set, its generation scores, to compare the trained model with.
    val_generate_at_start: bool = False

    def __post_init__(self):
        for name in ("global_batch_size", "local_batch_size", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "num_epochs", "val_every_steps", "ckpt_every_steps", "val_generate_every_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")

    def grad_accumulation_steps(self, dp_size: int) -> int:
        per_step = self.local_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise UserError(
                f"step_scheduler: global_batch_size {self.global_batch_size} is not a multiple of local_batch_size "
                f"{self.local_batch_size} x data-parallel size {dp_size} = {per_step}")
        return self.global_batch_size // per_step

    def total_steps(self, steps_per_epoch: int) -> tuple[int, str]:
        """(steps to run, a sentence saying what decided it)."""
        if steps_per_epoch < 1 and self.max_steps is None:
            raise UserError("step_scheduler: the training set is smaller than one global batch "
                            f"({self.global_batch_size} examples): lower global_batch_size or add data")
        epoch_steps = steps_per_epoch * (self.num_epochs or 1)
        if self.max_steps is None:
            return epoch_steps, f"{self.num_epochs or 1} epoch(s) x {steps_per_epoch} steps"
        if self.num_epochs is not None and epoch_steps < self.max_steps:
            return epoch_steps, f"num_epochs={self.num_epochs} ({steps_per_epoch} steps each) ends before " \
                                f"max_steps={self.max_steps}"
        epochs = self.max_steps / steps_per_epoch if steps_per_epoch else math.inf
        return self.max_steps, f"max_steps={self.max_steps} (~{epochs:.2f} epochs of {steps_per_epoch} steps)"

    def streaming_total_steps(self) -> tuple[int, str]:
        """(steps to run, why) for a streaming dataset, whose epochs cannot be counted ahead."""
        if self.max_steps is None:
            raise UserError("step_scheduler.max_steps: required with a streaming dataset (it has no length, so the "
                            "steps of an epoch are unknown); num_epochs may still end the run earlier")
        if self.num_epochs is None:
            return self.max_steps, f"max_steps={self.max_steps} (streaming: an epoch ends when the stream runs out)"
        return self.max_steps, f"max_steps={self.max_steps} or num_epochs={self.num_epochs}, whichever comes " \
                               "first (streaming: an epoch ends when the stream runs out)"

    @staticmethod
    def due(every: int | None, step: int, last_step: int) -> bool:
        """True every `every` steps and at the last step."""
        return step == last_step or (every is not None and step % every == 0)

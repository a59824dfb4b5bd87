"""Loss functions that inject faults through the normal `loss_fn._target_` config path.

They compute the real masked cross-entropy and, on their Nth call (one call per micro-batch), also do
something bad: send the process a signal or return NaN. Tests use them to make preemption and
non-finite losses happen at an exact step.
"""

from __future__ import annotations

import os
import signal

import torch

from automodel.training.loss import MaskedCrossEntropy


class SignalOnCall(MaskedCrossEntropy):
    def __init__(self, call: int, signame: str = "SIGTERM"):
        self.call, self.calls, self.signum = call, 0, getattr(signal, signame)

    def __call__(self, logits, labels):
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), self.signum)
        return super().__call__(logits, labels)


class NaNOnCall(MaskedCrossEntropy):
    def __init__(self, call: int):
        self.call, self.calls = call, 0

    def __call__(self, logits, labels):
        self.calls += 1
        loss = super().__call__(logits, labels)
        return loss * torch.nan if self.calls == self.call else loss

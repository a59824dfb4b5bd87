"""Loss functions that inject faults through the normal `loss_fn._target_` config path.

They compute the real masked cross-entropy (through whichever path the recipe uses: `head_loss`, the chunked
output head, by default, or `__call__` on logits) and, on their Nth call (one call per micro-batch), also do
something bad: send the process a signal or return NaN. Tests use them to make preemption and non-finite losses
happen at an exact step.
"""

from __future__ import annotations

import os
import signal

import torch

from automodel.training.loss import MaskedCrossEntropy


class FaultOnCall(MaskedCrossEntropy):
    """Counts micro-batches; `fault(loss)` runs on each and may act on the `call`-th."""

    def __init__(self, call: int):
        super().__init__()  # the default settings (chunk_size): a faulted run computes what a normal one does
        self.call, self.calls = call, 0

    def __call__(self, logits, labels):
        return self._counted(super().__call__(logits, labels))

    def head_loss(self, head, hidden, targets):
        return self._counted(super().head_loss(head, hidden, targets))

    def _counted(self, loss: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fault(loss) if self.calls == self.call else loss

    def fault(self, loss: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SignalOnCall(FaultOnCall):
    def __init__(self, call: int, signame: str = "SIGTERM"):
        super().__init__(call)
        self.signum = getattr(signal, signame)

    def fault(self, loss):
        os.kill(os.getpid(), self.signum)
        return loss


class NaNOnCall(FaultOnCall):
    def fault(self, loss):
        return loss * torch.nan

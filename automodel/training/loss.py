"""Masked next-token cross-entropy, summed over label tokens.

The recipe divides the sum by the label-token count of the whole optimizer step (all micro-batches,
all ranks), so gradient accumulation and data parallelism give the gradient of one large batch.

A loss function takes `(logits, targets)` already aligned: targets are the labels shifted by one
(`shift_labels`), and when the model computed logits only at label positions, just those targets.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from automodel.data.dataset import IGNORE_INDEX
from automodel.errors import UserError
from automodel.models.unwrap import transformers_model


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the softmax in fp32, or fp64 where the model runs in fp64 (never narrowed)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for each position: the next token's label; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens that contribute to the loss (after the shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def supports_label_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do, including a boolean
    [batch, seq] mask), so logits need not be computed where no label is."""
    return "logits_to_keep" in inspect.signature(transformers_model(model).forward).parameters


DEFAULT_CHUNK_SIZE = 1024


class MaskedCrossEntropy:
    """Sum of cross-entropy over targets that are not -100, computed in fp32 (fp64 for an fp64 model). `logits` is
    `[..., vocab]`, `targets` the matching `[...]`.

    `chunk_size` (label tokens, default 1024): the recipe applies the output head and this loss at the label
    positions only, that many label tokens at a time, so no `[label_tokens x vocab]` logits tensor ever exists
    (automodel/training/chunked_loss.py). `null` computes the label positions' logits in one piece through the
    model's forward (`logits_to_keep`)."""

    def __init__(self, chunk_size: int | None = DEFAULT_CHUNK_SIZE):
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise UserError(f"loss_fn.chunk_size: expected a positive number of label tokens or null, "
                            f"got {chunk_size!r}")
        self.chunk_size = chunk_size

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = targets != IGNORE_INDEX
        return F.cross_entropy(at_least_fp32(logits[mask]), targets[mask], reduction="sum")

    def head_loss(self, head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The same sum from the last hidden states at the label positions (`[label_tokens, hidden]`, every target a
        label): the output head applied `chunk_size` rows at a time."""
        from automodel.training.chunked_loss import chunked_head_cross_entropy

        return chunked_head_cross_entropy(head, hidden, targets, self.chunk_size)

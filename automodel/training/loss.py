"""Masked next-token cross-entropy, summed over label tokens.

The recipe divides the sum by the label-token count of the whole optimizer step (all micro-batches,
all ranks), so gradient accumulation and data parallelism give the gradient of one large batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for each position: the next token's label; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens that contribute to the loss (after the shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class MaskedCrossEntropy:
    """Sum of cross-entropy over positions whose (shifted) label is not -100, computed in fp32."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = shift_labels(labels)
        mask = targets != IGNORE_INDEX
        return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")

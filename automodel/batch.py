"""The batch contract: what a collated micro-batch holds and how its labels are read.

data/ builds batches to this contract (collators, datasets' -100 labels), models/ and training/ read them by it
(the model's inputs, the shifted targets, the label count). It sits below both, so neither imports the other.

A collated batch holds `input_ids` and `labels` ([batch, seq]; `IGNORE_INDEX` where no loss is taken), and, by
layout: padded, an `attention_mask` of 1s on real tokens; padding-free (one row of examples back to back),
`position_ids` restarting at 0 for every example and either the example boundaries `cu_seq_lens_q` /
`cu_seq_lens_k` with an all-ones `attention_mask` or (transformers' own attention) a `padding_mask` alone; packed,
`position_ids`, a 4D block-diagonal `attention_mask` and a `padding_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Label value that the loss ignores (the torch / Hugging Face convention).
IGNORE_INDEX = -100

# What the model's forward takes from a collated batch (the rest, labels and padding_mask, is the loss's).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward for `batch`."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a collated batch, padded (2D mask) or packed (`padding_mask`)."""
    return int(batch.get("padding_mask", batch["attention_mask"]).sum())


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for each position: the next token's label; the last position predicts nothing."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens that contribute to the loss (after the shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class BatchLayouts:
    """Which batch layouts the training model takes: decided where the model is known
    (automodel/models/capabilities.py `batch_layouts`) and handed to the collator (automodel/data/packing.py
    `build_collator`), which combines it with the `packed_sequence` section.

    `padding_free_problem`: None when padding-free rows (examples back to back, see above) are exact for this
    model, else why not (a phrase that follows "padding-free batching"). `position_ids_only`: those rows carry
    only the restarting `position_ids` (transformers' own attention reads the examples from them), no mask and no
    boundaries. `packing_problem`: None when the model takes packed rows with a 4D block-diagonal mask, else why
    not (a phrase that follows "packing")."""

    padding_free_problem: str | None
    position_ids_only: bool = False
    packing_problem: str | None = None

"""The batch contract: what a collated micro-batch holds and how its labels are read.

data/ builds batches to this contract (collators, datasets' -100 labels), models/ and training/ read them by it
(the model's inputs, the shifted targets, the label count). It sits below both, so neither imports the other.

A collated batch holds `input_ids` and `labels` ([batch, seq]; `IGNORE_INDEX` where no loss is taken), and, by
layout: padded, an `attention_mask` of 1s on real tokens; padding-free (one row of examples back to back),
`position_ids` restarting at 0 for every example and either the example boundaries `cu_seq_lens_q` /
`cu_seq_lens_k` with an all-ones `attention_mask` or (transformers' own attention) a `padding_mask` alone; packed,
`position_ids`, a 4D block-diagonal `attention_mask` and a `padding_mask`.

The collators that build those batches live here too (`pad_collate`/`PadCollator`: right padding to the longest
example of the micro-batch; `FlatCollator`: padding-free), so what a batch holds and how it is made read in one
place, and a training step's batch crosses one file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

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


def pad_collate(batch: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` padded with `pad_token_id`, `labels` with -100, and an `attention_mask` of 1s on real tokens."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    input_ids = [torch.tensor(item["input_ids"], dtype=torch.long) for item in batch]
    labels = [torch.tensor(item["labels"], dtype=torch.long) for item in batch]
    for index, (ids, item_labels) in enumerate(zip(input_ids, labels)):
        if ids.shape != item_labels.shape:
            raise ValueError(f"batch item {index}: {len(ids)} input_ids but {len(item_labels)} labels")
    lengths = torch.tensor([len(ids) for ids in input_ids], dtype=torch.long)
    longest = int(lengths.max())
    return {
        "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=pad_token_id),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": (torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)).long(),
    }


@dataclass(frozen=True)
class PadCollator:
    """`pad_collate` bound to a pad id; a top-level dataclass so DataLoader workers can pickle it."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return pad_collate(batch, self.pad_token_id)


@dataclass(frozen=True)
class FlatCollator:
    """Padding-free batches: one row holding the micro-batch's examples back to back, no padding token at all.

    `position_ids` restart at 0 for every example and `cu_seq_lens_q` / `cu_seq_lens_k` (transformers' names) are
    the example boundaries, which the attention (`automodel_sdpa`) uses to keep examples apart. Each example's
    first label is -100: it would be predicted from the previous example's last token. A padded batch never uses
    that label either (its shift drops it), so the loss is the padded batch's. The all-ones `attention_mask` tells
    transformers there is no padding (it would otherwise build a block-diagonal mask from the restarts).

    `position_ids_only`: for transformers' own attention (on CUDA), which finds the examples from the restarting
    `position_ids` alone when no `attention_mask` is given (flash-attention varlen, SDPA with a block-diagonal mask);
    the batch then carries no mask and no boundaries, and `padding_mask` (all ones) counts its tokens."""

    position_ids_only: bool = False

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        for index, item in enumerate(batch):
            if len(item["input_ids"]) != len(item["labels"]):
                raise ValueError(f"batch item {index}: {len(item['input_ids'])} input_ids but "
                                 f"{len(item['labels'])} labels")
        lengths = torch.tensor([len(item["input_ids"]) for item in batch])
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        # One tensor per example, then one cat: no Python loop over tokens.
        labels = torch.cat([torch.tensor(item["labels"], dtype=torch.long) for item in batch])
        labels[starts[:-1]] = IGNORE_INDEX
        total = int(starts[-1])
        boundaries = starts.to(torch.int32)
        flat = {
            "input_ids": torch.cat([torch.tensor(item["input_ids"], dtype=torch.long) for item in batch]).unsqueeze(0),
            "labels": labels.unsqueeze(0),
            "position_ids": (torch.arange(total) - starts[:-1].repeat_interleave(lengths)).unsqueeze(0),
        }
        if self.position_ids_only:
            return {**flat, "padding_mask": torch.ones(1, total, dtype=torch.long)}
        return {**flat, "attention_mask": torch.ones(1, total, dtype=torch.long), "cu_seq_lens_q": boundaries,
                "cu_seq_lens_k": boundaries}


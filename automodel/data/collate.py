"""Batching of variable-length SFT items: right padding to the longest sequence of the micro-batch, or padding-free
(the examples back to back in one row). What a batch holds is automodel/batch.py's contract."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from automodel.batch import IGNORE_INDEX


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


"""Batching of variable-length SFT items: right padding to the longest sequence of the micro-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from automodel.data.dataset import IGNORE_INDEX


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


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a collated batch, padded (2D mask) or packed (`padding_mask`)."""
    return int(batch.get("padding_mask", batch["attention_mask"]).sum())

"""Padding-free batches and packing.

Padding-free (the default where it is exact, `FlatCollator`): each micro-batch becomes one row of its examples back
to back; `automodel_sdpa` keeps them apart example by example, so no padding and no mask is computed.

Packing (`packed_sequence_size`): several examples share one row of up to `packed_sequence_size` tokens without
seeing each other. Each row gets `position_ids` that restart at 0 for every example and a 4D boolean block-diagonal causal
`attention_mask` (batch, 1, query, key) that transformers passes to SDPA unchanged. The first label of every
example is -100, so the last token of one example is never trained to predict the first token of the next.
This is the correctness baseline; ordering examples to fill rows tightly is a later optimisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from automodel.batch import IGNORE_INDEX, BatchLayouts, FlatCollator, PadCollator
from automodel.config import parse_section
from automodel.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class PackedSequenceConfig:
    """`packed_sequence:` section.

    `padding_free` (training batches): None (the default) flattens each micro-batch into one row without padding
    (`FlatCollator`) where the model takes it exactly (`BatchLayouts`, decided from the built model by
    automodel/models/capabilities.py: `automodel_sdpa` and a model type in `PADDING_FREE_VERIFIED`), and
    pads otherwise; true requires it; false always pads. `packed_sequence_size` > 0 packs rows of that many tokens
    with a block-diagonal mask instead; 0 (the default) turns that off."""

    packed_sequence_size: int = 0
    padding_free: bool | None = None

    def __post_init__(self):
        if self.packed_sequence_size < 0:
            raise ValueError(f"packed_sequence_size must be 0 (off) or positive, got {self.packed_sequence_size}")
        if self.packed_sequence_size and self.padding_free:
            raise ValueError("padding_free and packed_sequence_size > 0 are two ways of packing: choose one")


def build_collator(node: dict[str, Any] | None, pad_token_id: int, layouts: BatchLayouts, train: bool = True):
    """The recipe's collate function: `PackingCollator` when `packed_sequence.packed_sequence_size` > 0, else
    `FlatCollator` for padding-free training batches (see `PackedSequenceConfig`), else `PadCollator`. `layouts`
    says which the model takes. Validation batches are padded (their rows are counted one by one)."""
    cfg = parse_section(PackedSequenceConfig, node, "packed_sequence")
    if cfg.packed_sequence_size:
        if layouts.packing_problem:
            raise UserError(f"packed_sequence.packed_sequence_size: packing {layouts.packing_problem}")
        return PackingCollator(pad_token_id, cfg.packed_sequence_size)
    if train and padding_free(cfg.padding_free, layouts):
        return FlatCollator(position_ids_only=layouts.position_ids_only)
    return PadCollator(pad_token_id)


def padding_free(requested: bool | None, layouts: BatchLayouts) -> bool:
    """Whether training batches are flattened: `requested` (None: wherever the model takes it exactly)."""
    if requested is False:
        return False
    problem = layouts.padding_free_problem
    if problem and requested:
        raise UserError(f"packed_sequence.padding_free: {problem}")
    if problem:
        logger.info("padded batches: padding-free batching %s", problem.removesuffix("; set it to false"))
    return problem is None


def pack_rows(lengths: list[int], size: int) -> list[list[int]]:
    """Indices of the examples in each row, in order, a new row starting when the next example does not fit."""
    rows: list[list[int]] = []
    used = size
    for index, length in enumerate(lengths):
        if length > size:
            raise UserError(f"packed_sequence.packed_sequence_size: an example of {length} tokens does not fit "
                            f"in {size}; raise it or lower the dataset's seq_length")
        if used + length > size:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


@dataclass(frozen=True)
class PackingCollator:
    """Collate a micro-batch of examples into as few packed rows as fit `packed_sequence_size` tokens each."""

    pad_token_id: int
    packed_sequence_size: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        rows = pack_rows([len(item["input_ids"]) for item in batch], self.packed_sequence_size)
        width = max(sum(len(batch[i]["input_ids"]) for i in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        # Which example each token belongs to; every padding token is its own segment (it attends only to itself,
        # which keeps SDPA free of fully masked rows).
        segments = -torch.arange(1, width + 1).repeat(len(rows), 1)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                item = batch[i]
                n = len(item["input_ids"])
                if len(item["labels"]) != n:
                    raise ValueError(f"batch item {i}: {n} input_ids but {len(item['labels'])} labels")
                input_ids[r, start:start + n] = torch.tensor(item["input_ids"])
                labels[r, start:start + n] = torch.tensor(item["labels"])
                labels[r, start] = IGNORE_INDEX  # predicted from the previous example's last token: never a target
                position_ids[r, start:start + n] = torch.tensor(item.get("position_ids") or range(n))
                segments[r, start:start + n] = i
                start += n
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = (segments.unsqueeze(2) == segments.unsqueeze(1)) & causal
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "attention_mask": mask.unsqueeze(1), "padding_mask": (segments >= 0).long()}

"""The recipe's data: the `dataset` / `validation_dataset` sections built into datasets, and this rank's loaders.

A loader yields collated micro-batches of `local_batch_size` examples from this data-parallel rank's share: a
sampler over a map-style dataset (length-grouped by default when training, automodel/data/length_grouped.py), or
a round-robin share of a stream (automodel/data/streaming.py). The collator (automodel/data/packing.py) depends on
the batch layouts the model takes (`BatchLayouts`, decided where the model is built): padding-free where it takes
them, padded otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from automodel.batch import BatchLayouts
from automodel.config import TargetPolicy, build
from automodel.data.length_grouped import GROUP_BY_LENGTH_DEFAULT, build_train_sampler
from automodel.data.packing import build_collator
from automodel.data.squad import held_out_settings
from automodel.data.streaming import DEFAULT_SHUFFLE_BUFFER, RankShare, is_streaming
from automodel.errors import UserError

DEFAULT_LOADER = "torchdata.stateful_dataloader.StatefulDataLoader"


def build_dataset(cfg: dict[str, Any], section: str, policy: TargetPolicy, tokenizer):
    """The dataset of `section` (`dataset` or `validation_dataset`), tokenized with `tokenizer`."""
    node = {k: v for k, v in cfg[section].items() if k != "tokenizer"}
    if "_target_" not in node:
        raise UserError(f"{section}._target_: missing; name a builder such as "
                        "automodel.data.squad.make_squad_dataset")
    if section != "dataset":  # held out: what a question shows of its context must not depend on its answer
        node = held_out_settings(node, section)
    dataset = build(node, section, policy=policy, tokenizer=tokenizer)
    if is_streaming(dataset):
        if section != "dataset":
            raise UserError(f"{section}: streaming is for the training set; validation reads all its rows "
                            "each time, so set streaming: false (and limit_dataset_samples to cap it)")
        return dataset
    if len(dataset) == 0:
        raise UserError(f"{section}: the dataset is empty after filtering")
    return dataset


@dataclass(frozen=True)
class RankBatches:
    """What a loader needs to know of the job: the batch sizes and this process's data-parallel rank."""

    local_batch_size: int
    global_batch_size: int
    dp_size: int
    dp_rank: int
    seed: int


def build_loader(cfg: dict[str, Any], section: str, dataset, train: bool, policy: TargetPolicy, pad_token_id: int,
                 layouts: BatchLayouts, batches: RankBatches):
    """The loader of `section` (`dataloader` or `validation_dataloader`) over this rank's share of `dataset`;
    `layouts`: the batch layouts the model takes (automodel/models/capabilities.py `model_batch_layouts`)."""
    node = dict(cfg.get(section) or {})
    node.setdefault("_target_", DEFAULT_LOADER)
    shuffle = bool(node.pop("shuffle", train))
    collate_fn = build_collator(cfg.get("packed_sequence"), pad_token_id, layouts, train)
    if train and is_streaming(dataset):
        return _build_stream_loader(dataset, node, shuffle, collate_fn, policy, batches)
    sampler = build_train_sampler(
        dataset, node, batches.global_batch_size, batches.dp_size, batches.dp_rank, shuffle, batches.seed,
        GROUP_BY_LENGTH_DEFAULT) if train else StatefulDistributedSampler(
        dataset, num_replicas=batches.dp_size, rank=batches.dp_rank, shuffle=shuffle, seed=batches.seed,
        drop_last=train)
    return build(node, section, policy=policy, dataset=dataset, batch_size=batches.local_batch_size, sampler=sampler,
                 collate_fn=collate_fn, drop_last=train)


def _build_stream_loader(stream, node: dict, shuffle: bool, collate_fn, policy: TargetPolicy, batches: RankBatches):
    """A loader over this rank's round-robin share of the stream (automodel/data/streaming.py)."""
    if node.get("num_workers", 0):
        raise UserError("dataloader.num_workers: a streaming dataset is read in the training process; "
                        "set num_workers: 0")
    if node.pop("group_by_length", False):
        raise UserError("dataloader.group_by_length: needs every example's length up front, which a streaming "
                        "dataset does not have; set it to false")
    share = RankShare(stream, batches.dp_rank, batches.dp_size, shuffle, batches.seed,
                      node.pop("shuffle_buffer_size", DEFAULT_SHUFFLE_BUFFER))
    return build(node, "dataloader", policy=policy, dataset=share, batch_size=batches.local_batch_size,
                 collate_fn=collate_fn, drop_last=True)

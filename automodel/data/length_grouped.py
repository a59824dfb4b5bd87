"""Length-grouped batching: micro-batches of similar-length examples, so padding to the longest costs little.

Within a seeded shuffle of the epoch, examples are cut into megabatches of `megabatch_factor` x the global batch,
each megabatch is sorted by length and split into global batches, and the batches are shuffled. Every index is
yielded once per epoch; the order depends only on (seed, epoch), so `load_state_dict({"yielded": n})` skips exactly
the samples finished steps used, like torchdata's `StatefulDistributedSampler` which this extends. Groups are one
optimizer step's global batch and rank r takes every `num_replicas`-th index, so a step trains on the same examples
whatever the number of ranks (N processes train like one), and all ranks see similar lengths at the same step.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from automodel.errors import UserError

DEFAULT_MEGABATCH_FACTOR = 50
# Off by default: it cuts padding, but its measured speed gain was within the machine's noise
# (docs/guides/llm/performance.md); `dataloader.group_by_length: true` turns it on.
GROUP_BY_LENGTH_DEFAULT = False


def example_lengths(dataset) -> list[int]:
    """Token count of every item (map-style datasets of {"input_ids": [...]} items)."""
    return [len(dataset[index]["input_ids"]) for index in range(len(dataset))]


def grouped_order(lengths: Sequence[int], group_size: int, megabatch_size: int,
                  generator: torch.Generator | None) -> list[int]:
    """Indices in groups of `group_size` of similar length; shuffled (groups and megabatches) when `generator`
    is given. A final partial group stays last so dropping the tail drops only it."""
    count = len(lengths)
    order = torch.randperm(count, generator=generator).tolist() if generator is not None else list(range(count))
    groups: list[list[int]] = []
    for start in range(0, count, megabatch_size):
        mega = sorted(order[start:start + megabatch_size], key=lambda index: -lengths[index])
        groups.extend(mega[i:i + group_size] for i in range(0, len(mega), group_size))
    tail = [groups.pop()] if groups and len(groups[-1]) < group_size else []
    if generator is not None:
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    return [index for group in groups + tail for index in group]


class LengthGroupedSampler(StatefulDistributedSampler):
    """`StatefulDistributedSampler` whose epoch order groups examples of similar length (see the module doc)."""

    def __init__(self, dataset, lengths: Sequence[int], global_batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 megabatch_factor: int = DEFAULT_MEGABATCH_FACTOR):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for a dataset of {len(dataset)} items")
        if megabatch_factor < 1:
            raise UserError(f"dataloader.megabatch_factor: expected a positive integer, got {megabatch_factor!r}")
        self.lengths = list(lengths)
        self.group_size = global_batch_size
        self.megabatch_size = self.group_size * megabatch_factor

    def _epoch_order(self) -> list[int]:
        generator = None
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
        indices = grouped_order(self.lengths, self.group_size, self.megabatch_size, generator)
        if self.drop_last:
            indices = indices[:self.total_size]
        else:  # repeat from the start so every rank gets the same number of samples, as DistributedSampler does
            indices += (indices * (self.total_size // len(indices) + 1))[:self.total_size - len(indices)]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        self.yielded = self.next_yielded if self.next_yielded is not None else 0
        self.next_yielded = None
        for index in self._epoch_order()[self.yielded:]:
            self.yielded += 1
            yield index


def build_train_sampler(dataset, node: dict[str, Any], global_batch_size: int, num_replicas: int, rank: int,
                        shuffle: bool, seed: int, default_group_by_length: bool) -> StatefulDistributedSampler:
    """The training sampler: length-grouped unless `dataloader.group_by_length: false` (pops its keys from `node`)."""
    group = node.pop("group_by_length", default_group_by_length)
    factor = node.pop("megabatch_factor", DEFAULT_MEGABATCH_FACTOR)
    if not isinstance(group, bool):
        raise UserError(f"dataloader.group_by_length: expected true or false, got {group!r}")
    if isinstance(factor, bool) or not isinstance(factor, int):
        raise UserError(f"dataloader.megabatch_factor: expected a positive integer, got {factor!r}")
    if not group:
        return StatefulDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=True)
    return LengthGroupedSampler(dataset, example_lengths(dataset), global_batch_size, num_replicas=num_replicas,
                                rank=rank, shuffle=shuffle, seed=seed, drop_last=True, megabatch_factor=factor)

"""Streaming (iterable) training data in the recipe: each rank's share of the stream, resumable by position.

A streaming dataset has no length, so `step_scheduler.max_steps` sets the run length and an epoch ends when
the stream runs out. The stream is shuffled (when `dataloader.shuffle`, the default for training) through
`datasets`' seeded buffer, whose order changes with the epoch, and dealt round-robin to the data-parallel ranks:
rank r takes examples r, r + dp, r + 2 dp, ... Every optimizer step therefore consumes the next
`global_batch_size` examples of the epoch's stream whatever the number of ranks, so the position after `s`
steps is `s x global_batch_size` examples: the same rule as the map-style sampler, and a run resumes exactly,
also with another number of processes. Resuming reads (and tokenizes) the used examples of the epoch again to
skip them: `datasets`' own `skip()` after `shuffle()` does not skip a prefix of the shuffled order.
"""

from __future__ import annotations

import itertools
from typing import Any

from torch.utils.data import IterableDataset

from automodel.errors import UserError

DEFAULT_SHUFFLE_BUFFER = 10_000


def is_streaming(dataset: Any) -> bool:
    """An iterable dataset without a length (a `datasets.IterableDataset` or any `torch` IterableDataset)."""
    return not hasattr(dataset, "__len__")


class RankShare(IterableDataset):
    """This rank's examples of one epoch of `stream`, from a position given in examples of the whole stream."""

    def __init__(self, stream, rank: int, world_size: int, shuffle: bool, seed: int,
                 buffer_size: int = DEFAULT_SHUFFLE_BUFFER):
        if shuffle and not hasattr(stream, "shuffle"):
            raise UserError(f"dataloader.shuffle: a {type(stream).__name__} cannot be shuffled; return a "
                            "datasets.IterableDataset from the dataset builder or set dataloader.shuffle: false")
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise UserError(f"dataloader.shuffle_buffer_size: expected a positive integer, got {buffer_size!r}")
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, examples_used: int) -> None:
        """Iterate `epoch`'s order, after the first `examples_used` examples of the whole (all-rank) stream."""
        self.epoch, self.start = epoch, examples_used

    def epoch_stream(self):
        """The whole stream in this epoch's order (the same on every rank)."""
        if not self.shuffle:
            return self.stream
        stream = self.stream.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        stream.set_epoch(self.epoch)
        return stream

    def __iter__(self):
        return itertools.islice(iter(self.epoch_stream()), self.start + self.rank, None, self.world_size)

"""A frozen input embedding or output head split by vocabulary rows over the data-parallel processes (FSDP2 + LoRA).

Each process keeps its rows as a `DTensor` (`Shard(0)`), so the checkpoint reader fills only its slice and the
saved adapter never sees it. FSDP2 would gather such a table for the whole forward (its root unit) or, as a unit
of its own, into an all-gather buffer and then the parameter: two full copies for a moment, which at 7B scale is the
peak of the run. Here every process broadcasts its rows in turn:

- `VocabShardedEmbedding.forward`: each process takes its tokens' rows from each slice as it arrives, so one slice
  (vocab / P rows) is the most held beside the shard.
- `VocabShardedLinear`: the head is assembled from the slices in one buffer (one full copy, no second one) for the
  model's forward, again for its backward, and once for the chunked loss (`whole_head`,
  automodel/training/loss.py), which then runs exactly the operations the unsplit head runs.

Every process must call these the same number of times (each slice is a collective), which the model's forward and
`head_loss` (once per micro-batch, on every rank) do.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """(start, size) of each process's rows: `torch.chunk`'s split, which DTensor's `Shard(0)` uses."""
    step = -(-rows // parts)
    return [(min(r * step, rows), max(0, min(step, rows - r * step))) for r in range(parts)]


def vocab_slices(weight: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, the rows) of each process's slice of a `Shard(0)` DTensor, in rank order; a collective."""
    mesh = weight.device_mesh
    group, me, local = mesh.get_group(), mesh.get_local_rank(), weight.to_local()
    for rank, (start, size) in enumerate(row_ranges(weight.shape[0], mesh.size())):
        if size == 0:
            continue
        rows = local if rank == me else torch.empty((size, *local.shape[1:]), dtype=local.dtype, device=local.device)
        dist.broadcast(rows, src=dist.get_global_rank(group, rank), group=group)
        yield start, rows
        del rows


def shard_rows(param: nn.Parameter, mesh, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    """A frozen parameter as a `Shard(0)` DTensor over `mesh`: on the meta device while the model is (allocated
    later with the model), else this process's rows of the full tensor."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if param.is_meta:
        start, size = row_ranges(param.shape[0], mesh.size())[mesh.get_local_rank()]
        local = torch.empty((size, *param.shape[1:]), dtype=dtype, device="meta")
        sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=param.shape,
                                     stride=param.stride())
    else:
        sharded = distribute_tensor(param.detach().to(device=device, dtype=dtype), mesh, [Shard(0)],
                                    src_data_rank=None)
    return nn.Parameter(sharded, requires_grad=False)


class VocabShardedEmbedding(nn.Embedding):
    """nn.Embedding whose frozen `weight` is a `Shard(0)` DTensor."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty((*ids.shape, self.embedding_dim), dtype=self.weight.dtype, device=ids.device)
        for start, rows in vocab_slices(self.weight):
            inside = (ids >= start) & (ids < start + len(rows))
            out[inside] = F.embedding(ids[inside] - start, rows)
        return out


def gather_rows(weight: torch.Tensor) -> torch.Tensor:
    """The whole `Shard(0)` DTensor in one new buffer, each process's rows broadcast straight into their place."""
    mesh = weight.device_mesh
    group, me, local = mesh.get_group(), mesh.get_local_rank(), weight.to_local()
    whole = torch.empty(weight.shape, dtype=local.dtype, device=local.device)
    for rank, (start, size) in enumerate(row_ranges(weight.shape[0], mesh.size())):
        if size == 0:
            continue
        rows = whole[start:start + size]
        if rank == me:
            rows.copy_(local)
        dist.broadcast(rows, src=dist.get_global_rank(group, rank), group=group)
    return whole


class WholeHead(nn.Module):
    """The output head with its gathered weight, for the chunked loss: `F.linear`, as nn.Linear computes it."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.whole = weight  # a plain attribute: not a parameter, nothing to train

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.whole)


class VocabShardedLinear(nn.Linear):
    """A bias-free nn.Linear (the output head) whose frozen `weight` is a `Shard(0)` DTensor."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _GatheredLinear.apply(hidden, self)

    def whole(self) -> WholeHead:
        return WholeHead(gather_rows(self.weight))


class _GatheredLinear(torch.autograd.Function):
    """hidden @ weight.T with the weight gathered for the forward and again for the backward (not kept between)."""

    @staticmethod
    def forward(ctx, hidden, module):
        ctx.module = module
        return F.linear(hidden, gather_rows(module.weight))

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ gather_rows(ctx.module.weight), None


def shard_vocab_modules(modules: list[nn.Module], mesh, device: torch.device, dtype_of) -> set[nn.Parameter]:
    """Split each module's frozen weight by rows over `mesh` (one DTensor for a tied embedding and head) and give
    the module the class that computes with it; returns the new parameters."""
    done: dict[int, nn.Parameter] = {}
    for module in modules:
        weight = module.weight
        if id(weight) not in done:
            done[id(weight)] = shard_rows(weight, mesh, device, dtype_of(weight))
        module.weight = done[id(weight)]
        module.__class__ = VocabShardedEmbedding if isinstance(module, nn.Embedding) else VocabShardedLinear
    return set(done.values())


def vocab_shardable(module: nn.Module | None, frozen: set[nn.Parameter]) -> bool:
    """A plain nn.Embedding or bias-free nn.Linear (not a subclass with its own forward, not a LoRA wrapper) whose
    weight is one of the `frozen` root parameters and not already a DTensor (tensor parallel)."""
    from torch.distributed.tensor import DTensor

    weight = getattr(module, "weight", None)
    if weight is None or weight not in frozen or isinstance(weight, DTensor) or weight.dim() != 2:
        return False
    if type(module) is nn.Embedding:
        return module.max_norm is None and not module.sparse
    return type(module) is nn.Linear and module.bias is None

"""A frozen input embedding or output head split by vocabulary rows over the data-parallel processes (FSDP2 + LoRA).

Each process keeps its rows as a `DTensor` (`Shard(0)`), so the checkpoint reader fills only its slice and the
saved adapter never sees it. The module computes with one process's rows at a time: every process broadcasts its
rows in turn and each uses them for its own inputs, so at most one slice (vocab / P rows) is held beside the shard,
never the whole table. FSDP2 would gather the whole table (and an all-gather buffer of its size) for the forward,
which at 7B scale is the peak of the run.

- `VocabShardedEmbedding.forward`: each token's row is taken from the slice that holds it.
- `VocabShardedLinear.forward`: the logits are the slices' logits side by side; the backward (the gradient for the
  input) broadcasts the slices again.
- `vocab_sharded_cross_entropy`: the chunked loss's form (automodel/training/loss.py): the summed cross-entropy and
  its gradient for the hidden states from one pass over the slices, with an online log-sum-exp, so the logits of
  all label rows for the whole vocabulary never exist.

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


class VocabShardedLinear(nn.Linear):
    """A bias-free nn.Linear (the output head) whose frozen `weight` is a `Shard(0)` DTensor."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _SlicedLinear.apply(hidden, self)


class _SlicedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, module):
        ctx.module = module
        return torch.cat([hidden @ rows.T for _, rows in vocab_slices(module.weight)], dim=-1)

    @staticmethod
    def backward(ctx, grad_out):
        grad = None
        for start, rows in vocab_slices(ctx.module.weight):
            part = grad_out[..., start:start + len(rows)] @ rows
            grad = part if grad is None else grad.add_(part)
        return grad, None


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


# ---- the chunked loss's form ----------------------------------------------------------------------------------


class _VocabShardedCrossEntropy(torch.autograd.Function):
    """sum_i [logsumexp_v(a * h_i . w_v) - a * h_i . w_{t_i}] with h = hidden / divisor, and its gradient for
    `hidden`, from one pass over the slices: per row a running max `m`, a running sum of exp(logit - m) and
    (for the gradient) a running sum of exp(logit - m) * w_v, rescaled when `m` grows."""

    @staticmethod
    def forward(ctx, hidden, targets, module, scale, divisor, chunk_size, wants_grad):
        h = (hidden / divisor if divisor is not None else hidden).detach()
        rows, dev = len(h), h.device
        top = torch.full((rows,), -torch.inf, device=dev)
        sums = torch.zeros(rows, device=dev)
        target_logit = torch.zeros(rows, device=dev)
        weighted = torch.zeros((rows, h.shape[-1]), device=dev) if wants_grad else None
        target_rows = torch.zeros((rows, h.shape[-1]), device=dev) if wants_grad else None
        for start, slab in vocab_slices(module.weight):
            for first in range(0, rows, chunk_size):
                part = slice(first, first + chunk_size)
                logits = (h[part] @ slab.T).float() * scale
                new_top = torch.maximum(top[part], logits.max(dim=-1).values)
                rescale = torch.exp(top[part] - new_top)
                exps = torch.exp(logits - new_top[:, None])
                sums[part] = sums[part] * rescale + exps.sum(dim=-1)
                if wants_grad:
                    weighted[part] = weighted[part] * rescale[:, None] + (exps.to(slab.dtype) @ slab).float()
                top[part] = new_top
                local = targets[part] - start
                inside = (local >= 0) & (local < len(slab))
                chosen = inside.nonzero().squeeze(-1)
                target_logit[part][chosen] = logits[chosen, local[chosen]]
                if wants_grad:
                    target_rows[part][chosen] = slab[local[chosen]].float()
                del logits, exps
        total = (top + torch.log(sums) - target_logit).sum()
        if wants_grad:
            grad = (weighted / sums[:, None] - target_rows) * scale
            ctx.save_for_backward((grad / divisor if divisor is not None else grad).to(hidden.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None, None


def vocab_sharded_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The summed cross-entropy of `head(hidden)` (an OutputHead whose module is a VocabShardedLinear, without
    soft-capping) against `targets`, `chunk_size` rows of one slice's logits at a time."""
    scale = (head.logit_scale or 1.0) / (head.logit_divisor or 1.0)
    wants_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _VocabShardedCrossEntropy.apply(hidden, targets, head.module, scale, head.hidden_divisor, chunk_size,
                                           wants_grad)

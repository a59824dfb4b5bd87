"""Gradient-norm clipping that works on plain tensors and on DTensors from different meshes.

torch's `clip_grad_norm_` handles one kind at a time; tensor parallelism mixes sharded DTensors (the split
projections) with plain tensors (norms, embeddings), so the norm is computed per kind and then combined.
"""

from __future__ import annotations

import math

import torch


def _group_key(tensor: torch.Tensor):
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return (id(tensor.device_mesh), tuple(tensor.placements))
    return None


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Scale gradients so their global 2-norm is at most `max_norm` (None: only measure); returns the norm."""
    groups: dict = {}
    for param in params:
        if param.grad is not None:
            groups.setdefault(_group_key(param.grad), []).append(param)
    if not groups:
        return 0.0
    squares = []
    for key, members in groups.items():
        norm = torch.nn.utils.get_total_norm([p.grad for p in members], 2.0)
        squares.append((norm.full_tensor() if key is not None else norm).float().square())
    total = float(torch.stack(squares).sum().sqrt())
    # The same coefficient as torch.nn.utils.clip_grad_norm_.
    coef = max_norm / (total + 1e-6) if max_norm is not None and math.isfinite(max_norm) else 1.0
    if coef < 1.0:
        for members in groups.values():
            for param in members:
                param.grad.mul_(coef)
    return total

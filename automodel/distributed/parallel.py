"""The job's layout (a `dp x tp` device mesh) and what the recipe asks of it.

`Parallelism.from_config(cfg)` joins the process group that torchrun or srun set up, builds the mesh, decides the
strategy and resolves the run's precision for this device (config/precision.py); the recipe then calls
`parallelize(model)`, sums counts over the data-parallel ranks with `all_reduce_sum`, skips gradient synchronisation
on all but the last micro-batch of a step, and clips the gradients however the layout split them (`clip_grad_norm`).
In a single process every method is a no-op, so the recipe has one code path.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from automodel.batch import IGNORE_INDEX
from automodel.config.instantiate import parse_section
from automodel.config.precision import Precision, resolve_precision
from automodel.distributed.config import DistEnvConfig, DistributedConfig
from automodel.distributed.env import (LaunchEnv, init_process_group, leave_process_group, pick_device,
                                      read_launch_env)
from automodel.errors import UserError

logger = logging.getLogger("automodel")


def resolve_strategy(cfg: DistributedConfig, world_size: int) -> str:
    """The strategy that runs: `auto` is fsdp2 for several processes; one process always runs `none`."""
    if world_size == 1:
        if cfg.strategy not in ("auto", "none"):
            logger.info("distributed.strategy %s: one process, so the model is not sharded (strategy none)",
                        cfg.strategy)
        return "none"
    strategy = "fsdp2" if cfg.strategy == "auto" else cfg.strategy
    dp_size = world_size // cfg.tp_size
    if dp_size == 1:
        return "none"  # every process is a tensor-parallel peer: nothing to replicate or shard over data
    if strategy == "none" and dp_size > 1:
        raise UserError(f"distributed.strategy none: {world_size} processes were started; use fsdp2 or ddp, or "
                        "run a single process")
    if strategy == "ddp" and cfg.tp_size > 1 and dp_size > 1:
        raise UserError("distributed.strategy ddp cannot be combined with tp_size > 1 over several data-parallel "
                        "ranks; use strategy fsdp2")
    return strategy


class Parallelism:
    """Rank layout, device and parallel strategy of this process."""

    def __init__(self, cfg: DistributedConfig, env: LaunchEnv, device: torch.device, backend: str,
                 precision: Precision = Precision("fp32", "default")):
        if env.world_size % cfg.tp_size:
            raise UserError(f"distributed.tp_size {cfg.tp_size} does not divide the number of processes "
                            f"({env.world_size})")
        self.cfg, self.env, self.device, self.backend = cfg, env, device, backend
        self.precision = precision  # FSDP2's mixed-precision policy follows it
        # The context every forward runs in (autocast when mixed), chosen once: `with parallel.forward_context():`.
        self.forward_context = precision.forward_context(device)
        self.rank, self.world_size = env.rank, env.world_size
        self.tp_size = cfg.tp_size
        self.dp_size = env.world_size // cfg.tp_size
        self.strategy = resolve_strategy(cfg, env.world_size)
        self.mesh = None
        if env.world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device.type, (self.dp_size, self.tp_size), mesh_dim_names=("dp", "tp"))
        self.dp_rank = self.mesh.get_local_rank("dp") if self.mesh is not None else 0
        self.dp_group = self.mesh["dp"].get_group() if self.dp_size > 1 else None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Parallelism:
        """Read `distributed` and `dist_env`, then `start`."""
        return cls.start(cfg, parse_section(DistributedConfig, cfg.get("distributed"), "distributed"),
                         parse_section(DistEnvConfig, cfg.get("dist_env"), "dist_env"))

    @classmethod
    def start(cls, cfg: dict[str, Any], dist_cfg: DistributedConfig, env_cfg: DistEnvConfig) -> Parallelism:
        """Join the process group (when launched with several), build the mesh, resolve `cfg`'s precision for this
        process's device."""
        env = read_launch_env()
        device = pick_device(env.local_rank)
        backend = init_process_group(env, env_cfg, device)
        parallel = cls(dist_cfg, env, device, backend,
                       resolve_precision(cfg, device, peft=cfg.get("peft") is not None))
        if not parallel.is_main:
            logging.getLogger("automodel").setLevel(logging.WARNING)  # rank 0 speaks for the job
        if env.world_size > 1:
            logger.info("distributed: %d processes (%s, %s backend): strategy %s, data parallel %d x tensor "
                        "parallel %d", env.world_size, env.source, backend, parallel.strategy, parallel.dp_size,
                        parallel.tp_size)
        return parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- the model ----------------------------------------------------------------------------------

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Activation checkpointing, then tensor parallel over `tp`, then FSDP2 or DDP over `dp`."""
        return self.replicate(self.shard(model))

    def shard(self, model: nn.Module, split_vocab: bool = True) -> nn.Module:
        """Activation checkpointing, tensor parallel over `tp` and FSDP2 over `dp`: the steps that also work on a
        model whose parameters are still on the meta device (each process then allocates only its shards)."""
        from automodel.distributed.activation_checkpointing import enable_activation_checkpointing

        if self.cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.tp_size > 1:
            from automodel.distributed.tp import apply_tp

            apply_tp(model, self.mesh["tp"])
        if self.dp_size > 1 and self.strategy == "fsdp2":
            from automodel.distributed.fsdp2 import apply_fsdp2

            return apply_fsdp2(model, self.mesh["dp"], self.device, self.precision, self.cfg.cpu_offload,
                               split_vocab=split_vocab)
        return model

    def replicate(self, model: nn.Module) -> nn.Module:
        """DDP over `dp` when that is the strategy; it broadcasts rank 0's parameters, so they must be real."""
        if self.strategy == "ddp":
            from automodel.distributed.ddp import apply_ddp

            return apply_ddp(model, self.device, self.dp_group)
        return model

    @contextmanager
    def gradient_sync(self, model: nn.Module, enabled: bool):
        """Reduce gradients over `dp` only when `enabled` (the last micro-batch of a step)."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(enabled)
        context = model.no_sync() if isinstance(model, DistributedDataParallel) and not enabled else nullcontext()
        with context:
            yield

    # ---- collectives --------------------------------------------------------------------------------

    def all_reduce_sum(self, *values: float) -> list[float]:
        """Each value summed over the data-parallel ranks (tensor-parallel peers hold the same data)."""
        if self.dp_group is None:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.dp_group)
        return tensor.tolist()

    def dp_shard_size(self, num_items: int) -> int:
        """Real items this rank's DistributedSampler yields from `num_items` (it pads with repeats after them)."""
        return len(range(self.dp_rank, num_items, self.dp_size))

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        """The run's normal end: every rank finishes before any leaves the process group."""
        leave_process_group(wait_for_peers=True)


def mask_rows_after(batch: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """`batch` with the labels of every row from `keep` on set to ignore (padding rows of a sampler)."""
    if keep >= len(batch["labels"]):
        return batch
    labels = batch["labels"].clone()
    labels[max(keep, 0):] = IGNORE_INDEX
    return {**batch, "labels": labels}


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Scale gradients so their global 2-norm is at most `max_norm` (None: only measure); returns the norm.

    torch's `clip_grad_norm_` handles one kind of tensor at a time; tensor parallelism mixes sharded DTensors (the
    split projections) with plain tensors (norms, embeddings), so the norm is computed per kind and mesh, then
    combined."""
    groups: dict = {}
    for param in params:
        if param.grad is not None:
            groups.setdefault(_grad_group(param.grad), []).append(param)
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


def _grad_group(tensor: torch.Tensor):
    """The kind of a gradient for the norm: None for a plain tensor, (its mesh, its placements) for a DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return (id(tensor.device_mesh), tuple(tensor.placements))
    return None

"""Who am I in the job: rank, world size and device, read from torchrun's or SLURM's environment.

torchrun (and `automodel ... --nproc-per-node N`, which starts torchrun) sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. `srun` sets SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID; the rendezvous
address then comes from MASTER_ADDR / MASTER_PORT (the sbatch example exports them). torchrun's variables win
when both are present (torchrun started under srun).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from automodel.distributed.config import DistEnvConfig
from automodel.errors import UserError

logger = logging.getLogger("automodel")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_VARS = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """The process's place in the job, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single process"  # "torchrun", "slurm" or "single process"
    master_addr: str | None = None
    master_port: int | None = None


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise UserError(f"environment variable {name}={environ[name]!r}: expected an integer") from None


def _check_layout(rank: int, world: int, local: int, names: tuple[str, str, str]) -> None:
    """A rank outside the job would wait for peers that never come."""
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UserError(f"environment variables {names[0]}={rank}, {names[1]}={world}, {names[2]}={local}: expected "
                        f"0 <= {names[0]} < {names[1]} and {names[2]} >= 0")


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    return all(name in environ for name in TORCHRUN_VARS)


def launched_by_slurm(environ: Mapping[str, str] = os.environ) -> bool:
    """Inside an `srun` step with several tasks (a batch script alone is one process and is not a job step)."""
    return all(name in environ for name in SLURM_VARS) and _int_var(environ, "SLURM_STEP_NUM_TASKS") > 1


def read_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """The rank layout from torchrun's variables, else SLURM's, else a single process."""
    if launched_by_torchrun(environ):
        rank, world, local = (_int_var(environ, n) for n in TORCHRUN_VARS)
        _check_layout(rank, world, local, TORCHRUN_VARS)
        return LaunchEnv(rank, world, local, "torchrun")
    if launched_by_slurm(environ):
        rank, world, local = (_int_var(environ, n) for n in SLURM_VARS)
        _check_layout(rank, world, local, SLURM_VARS)
        nodes = _int_var(environ, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in environ else 1
        addr = environ.get("MASTER_ADDR")
        if addr is None:
            if nodes > 1:
                raise UserError("running under srun on several nodes but MASTER_ADDR is not set: export it as the "
                                "first node's hostname, e.g. MASTER_ADDR=$(scontrol show hostnames "
                                "\"$SLURM_JOB_NODELIST\" | head -n 1) (see examples/llm_finetune/slurm_multinode.sbatch)")
            addr = "127.0.0.1"
        port = _int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_MASTER_PORT
        return LaunchEnv(rank, world, local, "slurm", addr, port)
    return LaunchEnv()


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_backend(cfg: DistEnvConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def leave_process_group(wait_for_peers: bool) -> None:
    """Destroy this process's process groups before the interpreter exits (a no-op when none was joined).

    Gloo's worker threads outliving the interpreter's teardown abort the process (SIGABRT, "terminate called
    without an active exception"), which would hide a run's real exit code. At a run's normal end every rank waits
    for the others first, so none closes a connection a peer still uses; after an error it does not wait (the
    peers may be gone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def init_process_group(env: LaunchEnv, cfg: DistEnvConfig, device: torch.device) -> str:
    """Join the job's process group (a no-op for a single process); returns the backend used."""
    import torch.distributed as dist

    backend = pick_backend(cfg, device)
    if env.world_size == 1 or dist.is_initialized():
        return backend
    if ":" not in backend and not dist.is_backend_available(backend):
        raise UserError(f"dist_env.backend: '{backend}' is not available in this torch build "
                        f"(use gloo on CPU, nccl on NVIDIA GPUs)")
    init_method = None if env.source == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
    dist.init_process_group(backend=backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(minutes=cfg.timeout_minutes))
    return backend

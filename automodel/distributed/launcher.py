"""`automodel ... --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P]`.

The CLI re-runs itself as N workers per node through torchrun's Python API (`torch.distributed.run`), with the
launcher flags removed. A process already started by torchrun or srun never launches again: the recipe reads
its rank from the environment. When a worker fails, torchrun stops the others and this prints one line per
failed rank with its cause (signal, or the worker's exception recorded by torch elastic), and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from automodel.errors import UserError

logger = logging.getLogger("automodel")

# flag -> (argparse type, help)
LAUNCH_FLAGS: dict[str, tuple[type, str]] = {
    "--nproc-per-node": (int, "worker processes per node (one per GPU); starts torchrun"),
    "--nnodes": (int, "number of nodes (default 1)"),
    "--node-rank": (int, "this node's index, 0..nnodes-1 (default 0)"),
    "--master-addr": (str, "address of node 0 (default 127.0.0.1)"),
    "--master-port": (int, "port on node 0 for the rendezvous (default: a free port on one node, 29500 on several)"),
    "--rdzv-endpoint": (str, "host:port of a c10d rendezvous, instead of --master-addr/--master-port"),
}


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (kind, text) in LAUNCH_FLAGS.items():
        parser.add_argument(flag, flag.replace("-", "_").replace("__", "--"), type=kind, default=None, help=text)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def launch_requested(args: argparse.Namespace) -> bool:
    return any(getattr(args, _dest(flag)) is not None for flag in LAUNCH_FLAGS)


def strip_launcher_flags(argv: list[str]) -> list[str]:
    """`argv` without the launcher's flags (`--flag value` and `--flag=value`, dash or underscore spelling)."""
    spellings = set(LAUNCH_FLAGS) | {f.replace("-", "_").replace("__", "--") for f in LAUNCH_FLAGS}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in spellings:
            skip = True
        elif arg.split("=", 1)[0] not in spellings:
            kept.append(arg)
    return kept


def already_launched(environ: Mapping[str, str] = os.environ) -> str | None:
    """'torchrun' or 'slurm' when this process is one rank of a started job, else None.

    An srun step with one task per node is not: each task is its node's launcher (torchrun under srun)."""
    from automodel.distributed.env import launched_by_slurm, launched_by_torchrun

    if launched_by_torchrun(environ):
        return "torchrun"
    if launched_by_slurm(environ) and environ["SLURM_STEP_NUM_TASKS"] != environ.get("SLURM_STEP_NUM_NODES"):
        return "slurm"
    return None


def torchrun_args(args: argparse.Namespace, worker_argv: list[str]) -> list[str]:
    """torchrun's command line for these launcher flags; single node without a port uses a free port."""
    nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
    nnodes = 1 if args.nnodes is None else args.nnodes
    node_rank = 0 if args.node_rank is None else args.node_rank
    for flag, value, low in (("--nproc-per-node", nproc, 1), ("--nnodes", nnodes, 1), ("--node-rank", node_rank, 0)):
        if value < low:
            raise UserError(f"{flag}: expected an integer >= {low}, got {value}")
    if node_rank >= nnodes:
        raise UserError(f"--node-rank {node_rank}: expected 0..{nnodes - 1} for --nnodes {nnodes}")
    cmd = [f"--nproc-per-node={nproc}", f"--nnodes={nnodes}", "--max-restarts=0"]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                f"--rdzv-id={os.environ.get('SLURM_JOB_ID', 'automodel')}"]
    elif nnodes > 1 or args.master_port is not None or args.master_addr is not None:
        cmd += [f"--node-rank={node_rank}", f"--master-addr={args.master_addr or '127.0.0.1'}",
                f"--master-port={args.master_port or 29500}"]
    return cmd + ["--module", "automodel", *worker_argv]


def _cause(failure) -> str:
    """The worker's own exception when it recorded one, else how it ended.

    A rank that raised but was still shutting down when torchrun stopped it (a peer exited first) reports its
    exception, not the SIGTERM: an error every rank agreed on is named once per rank."""
    first_line = ""
    if _recorded(failure):  # the worker's exception, written by torch elastic's @record (see run_worker)
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        first_line = next(iter(str(message).strip().splitlines()), "")
    if failure.exitcode < 0:
        killed = f"was killed by signal {failure.signal_name()}"
        return f"raised {first_line} and then {killed}" if first_line else killed
    return f"exited with code {failure.exitcode}" + (f": {first_line}" if first_line else "")


def _likely_cause_first(failure) -> int:
    """A rank killed from outside is the cause, its peers' connection errors the effect; SIGTERM is what torchrun
    sends the survivors (after a rank that raised, it may still have been recording its own exception)."""
    if failure.exitcode < 0 and failure.signal_name() != "SIGTERM":
        return 0
    if _recorded(failure):
        return 1
    return 3 if failure.exitcode < 0 else 2


def _recorded(failure) -> bool:
    return os.path.isfile(failure.error_file)


def describe_failures(failures: dict[int, Any]) -> str:
    """One clause per failed rank, the likely cause first."""
    host = socket.gethostname()
    ordered = sorted(failures.items(), key=lambda item: (_likely_cause_first(item[1]), item[1].timestamp, item[0]))
    return "; ".join(f"worker rank {rank} (local rank {f.local_rank}, pid {f.pid}, on {host}) {_cause(f)}"
                     for rank, f in ordered)


def launch(args: argparse.Namespace, worker_argv: list[str]) -> int:
    """Run `python -m automodel <worker_argv>` as torchrun workers; 0 when all succeed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    cmd = torchrun_args(args, worker_argv)
    logger.info("launching %d worker(s) per node on %d node(s) through torchrun", args.nproc_per_node or 1,
                args.nnodes or 1)
    try:
        run(get_args_parser().parse_args(cmd))
    except ChildFailedError as err:
        raise WorkersFailed(describe_failures(err.failures)) from None
    except SignalException as err:
        raise WorkersFailed(f"the launcher received {err.sigval.name}; workers were stopped") from None
    return 0


class WorkersFailed(Exception):
    """A launched job ended with failed workers; the message names each failed rank and why."""


def check_config(config_path: str, overrides: list[str], world_size: int, allow_targets: tuple[str, ...] = (),
                 recipe: str | None = None) -> None:
    """Catch config errors once in the launcher instead of once per worker: the recipe's own checks
    (training/settings.py), then the process layout."""
    from automodel.config import interpolate
    from automodel.config.switches import load_person_config
    from automodel.distributed.parallel import resolve_strategy
    from automodel.training.settings import RecipeSettings

    cfg = interpolate(load_person_config(config_path, overrides, allow_targets))
    settings = RecipeSettings.from_config(cfg, cfg.get("recipe", recipe or "llm_finetune"), allow_targets, log=False)
    dist_cfg = settings.distributed
    if world_size % dist_cfg.tp_size:
        raise UserError(f"distributed.tp_size {dist_cfg.tp_size} does not divide the number of processes "
                        f"({world_size})")
    resolve_strategy(dist_cfg, world_size)
    settings.steps.grad_accumulation_steps(world_size // dist_cfg.tp_size)  # the batch splits over the ranks


def launch_if_requested(args: argparse.Namespace, argv: list[str], overrides: list[str],
                        recipe: str | None = None) -> int | None:
    """Launch the workers when launcher flags are given outside a started job; None means: run here."""
    if not launch_requested(args):
        return None
    inside = already_launched()
    if inside:
        logger.info("already one rank of a job started by %s: the launcher flags are ignored", inside)
        return None
    check_config(args.config, overrides, (args.nproc_per_node or 1) * (args.nnodes or 1),
                 tuple(getattr(args, "allow_target", ())), recipe)
    return launch(args, strip_launcher_flags(argv))


def run_worker(fn: Callable[[], Any]) -> Any:
    """Call `fn`; inside torchrun an exception is recorded where the launcher reads it, so its report names it."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return fn()
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)()

"""Everything a run needs to continue exactly where it stopped.

A step folder holds, next to the HF-loadable `model/`:
    dcp/                 model and optimizer state through torch.distributed.checkpoint (sharded per rank under
                         FSDP2, resharded on load, so a run can resume with another number of processes);
                         LoRA runs hold only the trainable (adapter) weights and their optimizer state
    trainer_state.json   step, epoch, position in the epoch, LR scheduler state, best validation loss
    rng/rank_<r>.pt      python, numpy and torch RNG states of each rank (tensors and plain values only)
    config.yaml          the resolved config, checked against the new one on resume

The data position is (epoch, steps done in that epoch): the sampler skips exactly the samples those steps used,
whatever the new world size, so nothing is replayed or skipped.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from automodel.errors import UserError

TRAINER_STATE = "trainer_state.json"
# What reading a damaged or truncated torch / dcp file raises.
UNREADABLE = (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError)


@dataclass
class TrainState:
    """Where the loop is. `step_in_epoch` counts finished optimizer steps of the current epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_val_loss: float | None = None


def _options(loading: bool = False) -> StateDictOptions:
    # Frozen weights (a LoRA run's base model) come from the pretrained checkpoint, never from ours. On load,
    # dcp.load already fails on any trainable key the checkpoint lacks; strict=False only lets the frozen
    # ones stay as loaded from the pretrained model.
    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def _trainable_names(model) -> set[str]:
    """Names of trainable parameters as get_state_dict spells them (without DDP's `module.` prefix)."""
    from torch.nn.parallel import DistributedDataParallel

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {name for name, p in inner.named_parameters(remove_duplicate=False) if p.requires_grad}


def _model_and_optim_state(model, optimizer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    # ignore_frozen_params still lets a frozen weight tied to another name through (a tied lm_head): drop it.
    trainable = _trainable_names(model)
    return {"model": {k: v for k, v in model_sd.items() if k in trainable}, "optim": optim_sd}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_extra": (int(pos), int(has_gauss), float(gauss)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), *state["numpy_extra"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class StateWriter(FileSystemWriter):
    """dcp's file writer, recording the state's folder in `.metadata` as `dcp` rather than its absolute path
    (which may name a folder from `${oc.env:...}`: no secrets at rest)."""

    def storage_meta(self) -> StorageMeta | None:
        meta = super().storage_meta()
        if meta is not None:
            meta.checkpoint_id = "dcp"
        return meta


def save_training_state(folder: Path, model, optimizer, lr_scheduler, state: TrainState) -> None:
    """Called on every rank with the same (temporary) folder; rank 0 writes the shared files."""
    dcp.save(_model_and_optim_state(model, optimizer), storage_writer=StateWriter(folder / "dcp"))
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / "rng" / f"rank_{_rank()}.pt")
    if _rank() == 0:
        payload = {"train_state": asdict(state), "lr_scheduler": lr_scheduler.state_dict()}
        (folder / TRAINER_STATE).write_text(json.dumps(payload, indent=1))


def load_model_state(folder: Path, model) -> None:
    """Only the trained weights of a step folder (for export); the optimizer state stays on disk."""
    trainable = _trainable_names(model)
    model_sd = {k: v for k, v in get_state_dict(model, [], options=_options())[0].items() if k in trainable}
    state = {"model": model_sd}
    load_dcp(state, folder / "dcp")
    set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={}, options=_options(loading=True))


def load_training_state(folder: Path, model, optimizer, lr_scheduler) -> TrainState:
    """Restore model, optimizer, scheduler and RNG in place; returns where the loop stopped."""
    if not (folder / TRAINER_STATE).is_file() or not (folder / "dcp").is_dir():
        raise UserError(f"checkpoint.restore_from: {folder} is not a complete automodel checkpoint "
                        f"(expected {TRAINER_STATE} and dcp/)")
    payload = read_trainer_state(folder / TRAINER_STATE)
    state = _model_and_optim_state(model, optimizer)
    load_dcp(state, folder / "dcp")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(loading=True))
    lr_scheduler.load_state_dict(payload["lr_scheduler"])
    rng_file = folder / "rng" / f"rank_{_rank()}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than saved: those ranks start fresh streams
        try:
            rng = torch.load(rng_file, weights_only=True)
        except UNREADABLE as err:
            raise UserError(f"checkpoint.restore_from: cannot read {rng_file}: {str(err).splitlines()[0]}") from err
        set_rng_state(rng)
    return TrainState(**payload["train_state"])


def read_trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json with the keys a resume needs, or a one-line error naming the file."""
    try:
        payload = json.loads(path.read_text())
        TrainState(**payload["train_state"])
        if not isinstance(payload["lr_scheduler"], dict):
            raise TypeError("lr_scheduler is not a mapping")
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"checkpoint.restore_from: {path} is not a valid trainer state ({type(err).__name__}: "
                        f"{err}); use another checkpoint") from None
    return payload


def _not_from_dcp(record: logging.LogRecord) -> bool:
    return "torch/distributed/checkpoint" not in record.pathname.replace(os.sep, "/")


def load_dcp(state: dict[str, Any], dcp_dir: Path) -> None:
    """dcp.load, with a damaged or mismatched checkpoint reported as one line naming the folder.

    dcp logs each failed read with its traceback on the root logger before raising; the error says it in one
    line, so those records are dropped while loading."""
    root = logging.getLogger()
    root.addFilter(_not_from_dcp)
    try:
        dcp.load(state, checkpoint_id=str(dcp_dir))
    except (CheckpointException, *UNREADABLE) as err:  # dcp wraps each rank's failure in a CheckpointException
        raise UserError(f"checkpoint: cannot read {dcp_dir}: {_first_failure(err)}") from err
    finally:
        root.removeFilter(_not_from_dcp)


def _first_failure(err: BaseException) -> str:
    """The underlying error of a dcp CheckpointException ({rank: (exception, traceback)}), in one line."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        err = next(iter(failures.values()))[0]
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"

"""Experiment trackers behind one small interface: log_metrics(step, values), log_params(cfg), close().

Each is enabled by its subsection of `logging` (`logging.wandb`, `logging.mlflow`, `logging.tensorboard`) and
uses the tracker's own client library, installed as an extra: `pip install 'automodel[wandb]'` and so on.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from automodel.config import parse_section
from automodel.config.redact import redact
from automodel.errors import UserError

logger = logging.getLogger("automodel")


class MetricsBackend(Protocol):
    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...

    def log_params(self, cfg: dict[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def require(module: str, extra: str, section: str):
    """Import a tracker's client, or stop with the one pip command that installs it."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{section}: the '{module}' package is not installed; run "
                        f"pip install 'automodel[{extra}]' or remove the {section} section")
    return importlib.import_module(module)


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"optimizer": {"lr": 1e-3}}` -> `{"optimizer.lr": "0.001"}`: how trackers show a config as params."""
    flat = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


# ---- Weights & Biases -------------------------------------------------------------------------------


@dataclass
class WandbConfig:
    """`logging.wandb`; mode `offline` writes run files under `dir` only (sync later with `wandb sync`)."""

    project: str = "automodel"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = "online"
    dir: str | None = None
    # wandb copies the console into the run's files by default; the console names resolved paths (a checkpoint_dir
    # from `${oc.env:...}`), so it stays out unless asked for ("wrap").
    console: Literal["off", "wrap", "auto"] = "off"


class WandbBackend:
    def __init__(self, settings: WandbConfig, run_dir: Path, default_name: str):
        wandb = require("wandb", "wandb", "logging.wandb")
        folder = Path(settings.dir) if settings.dir else run_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=settings.project, entity=settings.entity, name=settings.name or default_name,
                              tags=settings.tags or None, mode=settings.mode, dir=str(folder),
                              reinit="create_new", settings=wandb.Settings(console=settings.console))

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_params(self, cfg: dict[str, Any]) -> None:
        self.run.config.update(cfg, allow_val_change=True)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ---- MLflow -----------------------------------------------------------------------------------------


@dataclass
class MlflowConfig:
    """`logging.mlflow`; the default store is a SQLite file in the checkpoint folder."""

    tracking_uri: str | None = None
    experiment: str = "automodel"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


class MlflowBackend:
    # MLflow takes at most 100 params per log_batch call.
    PARAMS_PER_BATCH = 100

    def __init__(self, settings: MlflowConfig, run_dir: Path, default_name: str):
        require("mlflow", "mlflow", "logging.mlflow")
        from mlflow.entities import Metric, Param, RunStatus
        from mlflow.tracking import MlflowClient

        self._metric, self._param, self._status = Metric, Param, RunStatus
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = settings.tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(settings.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(settings.experiment)
        tags = {k: str(v) for k, v in settings.tags.items()}
        self.run_id = self.client.create_run(experiment_id, run_name=settings.run_name or default_name,
                                             tags=tags).info.run_id

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step) for k, v in values.items()])

    def log_params(self, cfg: dict[str, Any]) -> None:
        params = [self._param(k, v[:6000]) for k, v in flatten(cfg).items()]
        for start in range(0, len(params), self.PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + self.PARAMS_PER_BATCH])

    def close(self, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        self.client.set_terminated(self.run_id, status=status)


# ---- TensorBoard ------------------------------------------------------------------------------------


@dataclass
class TensorBoardConfig:
    """`logging.tensorboard`; default log_dir: `<checkpoint_dir>/tensorboard`."""

    log_dir: str | None = None


class TensorBoardBackend:
    def __init__(self, settings: TensorBoardConfig, run_dir: Path, resume_step: int):
        require("tensorboard", "tensorboard", "logging.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        log_dir = settings.log_dir or str(run_dir / "tensorboard")
        # purge_step hides what an interrupted run logged after the checkpoint this run resumes from.
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=resume_step + 1 if resume_step else None)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def log_params(self, cfg: dict[str, Any]) -> None:
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(cfg, sort_keys=False) + "```")

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def backend_settings(log_cfg) -> dict[str, Any]:
    """The parsed `logging.<tracker>` sections that are present; stops early when a client is missing."""
    sections = {"wandb": (WandbConfig, "wandb"), "mlflow": (MlflowConfig, "mlflow"),
                "tensorboard": (TensorBoardConfig, "tensorboard")}
    settings = {}
    for name, (cls, module) in sections.items():
        node = getattr(log_cfg, name)
        if node is not None:
            settings[name] = parse_section(cls, node, f"logging.{name}")
            require(module, name, f"logging.{name}")
    return settings


# What a tracker stores as names and labels: taken as the config writes them (before `${oc.env:...}`), like the
# config itself. Where data goes (wandb entity/project/dir, mlflow tracking_uri, tensorboard log_dir) is resolved.
AS_WRITTEN = {"wandb": ("name", "tags"), "mlflow": ("experiment", "run_name", "tags")}


def as_written(settings: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
    """`settings` with the AS_WRITTEN fields replaced by the at-rest config's `logging.<tracker>` values."""
    chosen = {}
    for tracker, parsed in settings.items():
        section = written.get(tracker) if isinstance(written.get(tracker), dict) else {}
        chosen[tracker] = replace(parsed, **{key: redact(section[key]) for key in AS_WRITTEN.get(tracker, ())
                                              if key in section})
    return chosen


def default_run_name(run_dir: Path, cfg: dict[str, Any]) -> str:
    """The checkpoint folder's name, as the config writes it when it comes from the environment."""
    written = str((cfg.get("checkpoint") or {}).get("checkpoint_dir", ""))
    return Path(written).name if "${" in written else run_dir.resolve().name


def build_backends(log_cfg, run_dir: Path, cfg: dict[str, Any], resume_step: int = 0) -> list[MetricsBackend]:
    """The trackers whose `logging.<name>` sections are present, each holding the config as written down (before
    `${oc.env:...}` interpolation; secret-looking values redacted again here, whoever passes `cfg`) and its run
    names and tags as written (`cfg` is the config at rest: config/redact.py)."""
    name = default_run_name(run_dir, cfg)
    settings = as_written(backend_settings(log_cfg), cfg.get("logging") or {})
    backends: list[MetricsBackend] = []
    if "wandb" in settings:
        backends.append(WandbBackend(settings["wandb"], run_dir, name))
    if "mlflow" in settings:
        backends.append(MlflowBackend(settings["mlflow"], run_dir, name))
    if "tensorboard" in settings:
        backends.append(TensorBoardBackend(settings["tensorboard"], run_dir, resume_step))
    for backend in backends:
        backend.log_params(redact(cfg))
    return backends

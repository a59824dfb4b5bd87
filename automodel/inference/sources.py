"""What a path on the command line holds: a checkpoint_dir, a step folder, an HF model folder, an adapter or a hub id.

Every after-training command takes the same kinds of input, so they all resolve it here to a `ModelSource`:
the base model (hub id or folder), the LoRA adapter folder if any, and the training run's resolved config
and metrics when the input came from a checkpoint (eval reuses its prompt, push its card data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automodel.config.loader import interpolate
from automodel.config.redact import read_run_config
from automodel.errors import UserError
from automodel.models import gguf
from automodel.paths import check_not_link, check_step_name

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class ModelSource:
    """A model to load: `base` (+ `adapter`), with the training run's config/metrics when known."""

    base: str
    adapter: Path | None = None
    gguf_file: str | None = None  # the base is this GGUF file in the `base` folder or repo
    train_config: dict[str, Any] | None = None
    step_dir: Path | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_folder(self) -> Path | None:
        """The folder that holds the trained weights: the adapter, or a full model folder."""
        if self.adapter is not None:
            return self.adapter
        return Path(self.base) if Path(self.base).is_dir() and self.gguf_file is None else None

    @property
    def saved_config(self) -> Path | None:
        """The training run's config.yaml this source was read with, if any."""
        return self.step_dir / "config.yaml" if self.step_dir is not None else None

    def describe(self) -> str:
        base = f"{self.base} (GGUF {self.gguf_file})" if self.gguf_file else self.base
        return f"{base} + adapter {self.adapter}" if self.adapter else base


def resolve_source(model: str, adapter: str | None = None, key: str = "model") -> ModelSource:
    """Resolve `model` (and an optional separate `adapter`) to a `ModelSource`."""
    source = _resolve_one(model, key)
    if adapter is None:
        return source
    extra = _resolve_one(adapter, "adapter")
    if extra.adapter is None:
        raise UserError(f"adapter: {adapter} holds no {ADAPTER_CONFIG}: expected a LoRA adapter folder "
                        "or a checkpoint of a LoRA run")
    if source.adapter is not None:
        raise UserError(f"{key}: {model} already holds an adapter; give the base model with --model")
    # The explicit base wins over the adapter's recorded base; the run's config and metrics come from the adapter.
    return ModelSource(base=source.base, adapter=extra.adapter, gguf_file=source.gguf_file,
                       train_config=extra.train_config, step_dir=extra.step_dir, metrics=extra.metrics)


def _resolve_one(name: str, key: str) -> ModelSource:
    path = Path(name).expanduser()
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise UserError(f"{key}: not found: {name}")
        return ModelSource(base=name)  # a hub id
    if path.is_file() and path.suffix == gguf.SUFFIX:
        return ModelSource(base=str(path.parent), gguf_file=path.name)
    if not path.is_dir():
        raise UserError(f"{key}: {path} is a file; expected a model folder, a .gguf file, a checkpoint step folder "
                        "or a checkpoint_dir")
    if (path / "LATEST").is_file():
        return _from_step_dir(_latest(path), key)
    if (path / "model").is_dir() and (path / "config.yaml").is_file():
        return _from_step_dir(path, key)
    return _from_model_folder(path, key, train_config=None)


def _latest(checkpoint_dir: Path) -> Path:
    step = checkpoint_dir / check_step_name((checkpoint_dir / "LATEST").read_text(), checkpoint_dir / "LATEST")
    if not step.is_dir():
        raise UserError(f"{checkpoint_dir}/LATEST names {step.name}, which does not exist")
    return check_not_link(step, "model")


def _from_step_dir(step_dir: Path, key: str) -> ModelSource:
    train_config = read_run_config(step_dir / "config.yaml")
    source = _from_model_folder(step_dir / "model", key, train_config)
    source.step_dir = step_dir
    source.metrics = read_metrics(step_dir.parent / metrics_file_name(train_config), step_number(step_dir))
    return source


def _from_model_folder(folder: Path, key: str, train_config: dict | None) -> ModelSource:
    if (folder / ADAPTER_CONFIG).is_file():
        if not (folder / ADAPTER_WEIGHTS).is_file():  # peft would fall back to a pickled adapter_model.bin
            raise UserError(f"{key}: {folder} holds no {ADAPTER_WEIGHTS}; adapters are read as safetensors only "
                            "(a .bin file is a pickle, which can run code)")
        base, gguf_file = adapter_base(folder, train_config, key)
        return ModelSource(base=base, adapter=folder, gguf_file=gguf_file, train_config=train_config)
    if (folder / MODEL_CONFIG).is_file():
        return ModelSource(base=str(folder), train_config=train_config)
    if gguf.single_gguf_file(folder):
        return ModelSource(base=str(folder), gguf_file=gguf.single_gguf_file(folder), train_config=train_config)
    raise UserError(f"{key}: {folder} holds neither {MODEL_CONFIG} (a model) nor {ADAPTER_CONFIG} (a LoRA adapter) "
                    f"nor one {gguf.SUFFIX} file, and is not a checkpoint step folder or checkpoint_dir")


def adapter_base(adapter: Path, train_config: dict | None, key: str) -> tuple[str, str | None]:
    """The base model an adapter was trained on, and its GGUF file if it is one: the training config's, else
    adapter_config.json's (a folder holding a single GGUF file is that file)."""
    recorded = read_json(adapter / ADAPTER_CONFIG).get("base_model_name_or_path")
    if isinstance(recorded, str) and "${" in recorded:  # written as the run's config wrote it: resolve it here
        recorded = interpolate(recorded)
    model_config = (train_config or {}).get("model") or {}
    from_config = model_config.get("pretrained_model_name_or_path")
    if from_config and model_config.get("gguf_file"):
        return from_config, model_config["gguf_file"]
    for candidate in (from_config, recorded):
        if candidate and Path(candidate).expanduser().is_dir():
            return candidate, gguf.single_gguf_file(Path(candidate).expanduser())
        if candidate and not _looks_local(candidate):
            return candidate, None
    raise UserError(f"{key}: the base model of adapter {adapter} ({from_config or recorded or 'not recorded'}) is not "
                    "found from here; name it with --model BASE --adapter ADAPTER")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def step_number(step_dir: Path) -> int | None:
    suffix = step_dir.name.rpartition("_")[2]
    return int(suffix) if suffix.isdigit() else None


def metrics_file_name(train_config: dict | None) -> str:
    return ((train_config or {}).get("logging") or {}).get("metrics_file", "metrics.jsonl")


def read_metrics(path: Path, up_to_step: int | None) -> list[dict[str, Any]]:
    """The run's metrics records up to the checkpoint's step (a later step's record does not describe it)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if up_to_step is None or r.get("step", 0) <= up_to_step]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data

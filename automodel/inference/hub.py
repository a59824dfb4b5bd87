"""Share a trained model or adapter on the Hugging Face Hub, with a model card written from the run.

The upload is one Hub commit (`create_commit`): it lands whole or not at all, so a failure part-way
never leaves a half-uploaded model that looks like a success. The token comes from where
huggingface_hub always looks (HF_TOKEN, then the `hf auth login` cache) and is never printed.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from automodel.config.loader import load_yaml
from automodel.config.redact import redact
from automodel.errors import UserError
from automodel.inference.sources import ModelSource
from automodel.paths import check_not_link

logger = logging.getLogger("automodel")

# What a model folder needs on the Hub: weights, configs, tokenizer files. Optimizer/trainer state
# (*.pt, *.bin from other tools), hidden and temporary files stay home.
UPLOAD_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                   "adapter_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.*", "vocab.*", "merges.txt", "*.tiktoken", "spiece.model")


def select_files(folder: Path) -> list[str]:
    """The file names of `folder` to upload (sorted); the model card is written separately."""
    check_not_link(folder, "push")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in UPLOAD_PATTERNS)]
    for name in chosen:  # a link must not upload a file from elsewhere, nor a hard link one that lives elsewhere too
        check_not_link(folder / name, "push")
        if (folder / name).stat().st_nlink > 1:
            raise UserError(f"push: {folder / name} is a hard link ({(folder / name).stat().st_nlink} names for one "
                            "file), so it may be a file from elsewhere; copy it into the folder (cp, not ln) to "
                            "upload it")
    if not any(n.endswith(".safetensors") for n in chosen):
        raise UserError(f"{folder}: no .safetensors weights to upload")
    return chosen


def is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(str(name)).expanduser().exists() and not str(name).startswith((".", "/", "~")) \
        and str(name).count("/") <= 1


# ---------------------------------------------------------------- model card


def model_card(source: ModelSource, repo_id: str, scores: dict[str, Any] | None = None) -> str:
    """README.md text: YAML metadata (base model, library, datasets, tags) + training config and final metrics."""
    from huggingface_hub import ModelCardData

    # Everything the card says about the run is the config as the run wrote it down: `${oc.env:...}` unresolved,
    # secret-looking values redacted (config/redact.py; again here, for a config.yaml written elsewhere).
    saved = source.step_dir / "config.yaml" if source.step_dir is not None else None
    config = redact(load_yaml(saved) if saved is not None and saved.is_file() else source.train_config or {})
    base = _base_as_written(source, config)
    lora = source.adapter is not None
    datasets = sorted({name for name in _dataset_names(config) if is_hub_id(name)})
    data = ModelCardData(
        base_model=base if lora and is_hub_id(base) else _base_of_full_model(config),
        library_name="peft" if lora else "transformers", datasets=datasets or None,
        tags=["automodel", "lora" if lora else "full-fine-tune", "text-generation"], pipeline_tag="text-generation")
    parts = [f"---\n{data.to_yaml()}\n---\n", f"# {repo_id.rsplit('/', 1)[-1]}\n", _summary(source, config, base),
             _metrics_section(source.metrics), _scores_section(scores), _usage_section(source, repo_id)]
    if config:
        parts.append("## Training configuration\n\nThe `automodel` recipe config of the run:\n\n"
                     f"```yaml\n{yaml.safe_dump(config, sort_keys=False)}```\n")
    return "\n".join(part for part in parts if part)


def _dataset_names(config: dict) -> list[str]:
    return [str((config.get(s) or {}).get("dataset_name")) for s in ("dataset", "validation_dataset")
            if (config.get(s) or {}).get("dataset_name")]


def _base_of_full_model(config: dict) -> str | None:
    base = (config.get("model") or {}).get("pretrained_model_name_or_path")
    return base if is_hub_id(base) else None


def _base_as_written(source: ModelSource, written: dict) -> str:
    """The base model as the run's config (or the adapter's config) writes it, unless another base was named."""
    from automodel.config.loader import interpolate
    from automodel.inference.sources import ADAPTER_CONFIG, read_json

    candidates = [(written.get("model") or {}).get("pretrained_model_name_or_path")]
    if source.adapter is not None:
        candidates.append(read_json(source.adapter / ADAPTER_CONFIG).get("base_model_name_or_path"))
    for candidate in candidates:
        if isinstance(candidate, str) and "${" in candidate and interpolate(candidate) == source.base:
            return candidate
    return source.base


def _summary(source: ModelSource, config: dict, base: str) -> str:
    base = base if source.adapter else (config.get("model") or {}).get("pretrained_model_name_or_path")
    peft = config.get("peft") or {}
    method = (f"a LoRA adapter (rank {peft.get('dim', '?')}, alpha {peft.get('alpha', '?')}, target modules "
              f"{peft.get('target_modules', '?')})" if source.adapter else "a full fine-tune")
    return f"This is {method} of `{base or 'unknown base model'}`, trained with automodel.\n"


def _metrics_section(metrics: list[dict[str, Any]]) -> str:
    train = [r for r in metrics if r.get("kind") == "train"]
    val = [r for r in metrics if r.get("kind") == "validation"]
    if not train and not val:
        return ""
    rows = []
    if train:
        rows.append(f"| training loss | {train[-1]['loss']:.4f} | {train[-1]['step']} |")
    if val:
        rows.append(f"| validation loss | {val[-1]['val_loss']:.4f} | {val[-1]['step']} |")
    return "## Final metrics\n\n| metric | value | step |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def _scores_section(scores: dict[str, Any] | None) -> str:
    if not scores:
        return ""
    return (f"## Evaluation\n\nSQuAD v{scores.get('version', '1.1')} by generation on {scores.get('total', '?')} "
            f"questions of `{Path(str(scores.get('dataset', '?'))).name}`: exact match "
            f"{scores['exact_match']:.2f}, F1 {scores['f1']:.2f}.\n")


def _usage_section(source: ModelSource, repo_id: str) -> str:
    if source.adapter is not None:
        code = (f"from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained("
                f"\"{repo_id}\")")
    else:
        code = f"from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained(\"{repo_id}\")"
    return f"## Usage\n\n```python\n{code}\n```\n"


# ---------------------------------------------------------------- upload


@dataclass
class PushPlan:
    """What `push` will send: the folder, its files, and the model card text."""

    folder: Path
    files: list[str]
    card: str


def plan_push(source: ModelSource, repo_id: str, scores: dict[str, Any] | None = None) -> PushPlan:
    check_repo_id(repo_id)
    folder = source.model_folder
    if folder is None:
        raise UserError(f"model: {source.base} is not a local folder; push uploads a model or adapter folder "
                        "or a checkpoint")
    return PushPlan(folder=folder, files=select_files(folder), card=model_card(source, repo_id, scores))


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--repo-id: {repo_id!r} is not a valid Hub repo id ({str(err).splitlines()[0]})") from None


def push(plan: PushPlan, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str = "Upload model trained with automodel") -> str:
    """Create the repo if missing (and the branch), then upload everything in one commit; returns its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if get_token() is None:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)")
    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(plan.folder / name)) for name in plan.files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode()))
    with hub_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    return info.commit_url


class hub_errors:
    """Turn the Hub client's failures into one-line UserErrors (no token, no traceback)."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        if error is None:
            return False
        if isinstance(error, OfflineModeIsEnabled):
            raise UserError(f"cannot push to {self.repo_id}: offline mode is on (HF_HUB_OFFLINE=1); nothing was "
                            "uploaded") from None
        if isinstance(error, HfHubHTTPError):
            status = error.response.status_code if error.response is not None else None
            why = ("the token is not authorised to write there (check `hf auth whoami` and the token's write access)"
                   if status in (401, 403) else str(error).splitlines()[0])
            raise UserError(f"cannot push to {self.repo_id}: {why}; nothing was uploaded") from None
        if isinstance(error, (OSError, ConnectionError)) or type(error).__module__.startswith(("httpx", "httpcore")):
            raise UserError(f"cannot push to {self.repo_id}: the Hub is unreachable ({type(error).__name__}); check "
                            "the network or HF_ENDPOINT; nothing was uploaded") from None
        return False

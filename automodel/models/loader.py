"""Load a Hugging Face causal LM and its tokenizer from a hub id or a local folder.

Everything goes through transformers' Auto classes, so any architecture transformers knows natively
loads the same way; the published checkpoints of some remote-code-only families load into native classes
(automodel/models/families); remote code runs only when the config says `trust_remote_code: true`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from automodel.errors import UserError
from automodel.models import attention, gguf

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype, key: str = "model.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"{key}: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    # Hub ids are 'name' or 'org/name'; anything with more slashes, a leading ./ ~ / or a file suffix is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name


def check_source(name: str, key: str, required_file: str | None = None) -> str:
    """Fail early on a local folder that is not there, instead of transformers' repo-id complaint."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{key}: expected a hub id (org/name) or a local folder, got {name!r}")
    path = Path(name).expanduser()
    if path.exists():
        if required_file and not (path / required_file).is_file():
            raise UserError(f"{key}: {path} has no {required_file}: expected a Hugging Face model folder")
        return str(path)
    if _looks_like_path(name):
        raise UserError(f"{key}: folder not found: {name}")
    return name


def _hub_error(name: str, key: str, err: Exception) -> UserError:
    return UserError(
        f"{key}: could not load '{name}' from the Hugging Face Hub ({str(err).splitlines()[0]}); "
        "this machine may be offline or the id may be wrong (gated models also need `hf auth login`): "
        "point it at a local folder that holds config.json and the weights instead")


MODEL_KEY = "model.pretrained_model_name_or_path"
# What the meta-device build reads from a hub repository: config, safetensors weights and their index; the `.bin`
# pickles and their index only for a repository without safetensors (older checkpoints).
HUB_WEIGHT_PATTERNS = ["*.json", "*.safetensors"]
HUB_BIN_PATTERNS = ["pytorch_model*.bin"]


def model_error(source: str, err: Exception, key: str = MODEL_KEY) -> UserError:
    """One line for transformers' failure to load `source`: a local folder's problem or an unreachable hub."""
    if isinstance(err, OSError) and not Path(source).exists():
        return _hub_error(source, key, err)
    if isinstance(err, OSError):
        return UserError(f"{key}: cannot load {source}: {str(err).splitlines()[0]}")
    return UserError(f"{key}: {source}: {str(err).splitlines()[0]}")  # unknown architecture, remote code needed


def resolve_model_folder(name: str, revision: str | None = None) -> Path:
    """The local folder of a model: the folder itself, or the hub repository's config and weights fetched into the
    Hugging Face cache (safetensors; `.bin` files when the repository has no safetensors)."""
    source = check_source(name, MODEL_KEY, required_file="config.json")
    if Path(source).exists():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, revision=revision, allow_patterns=HUB_WEIGHT_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(source, revision=revision, allow_patterns=HUB_BIN_PATTERNS))
        return folder
    except Exception as err:  # huggingface_hub raises several types (offline, gated, not found): all one line
        raise _hub_error(source, MODEL_KEY, err) from err


def load_causal_lm(pretrained_model_name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None,
                   trust_remote_code: bool = False, revision: str | None = None, gguf_file: str | None = None,
                   **config_overrides):
    """`AutoModelForCausalLM.from_pretrained` with the recipe's defaults and one-line errors.

    `attn_implementation` unset lets transformers choose: sdpa where the architecture supports it, eager
    otherwise (Gemma 2, whose attention soft-capping SDPA cannot do, so asking it for `sdpa` is an error); a model
    given sdpa then runs `automodel_sdpa` (automodel/models/attention.py: the same math, faster on CPU, and
    padding-free batches). Name `sdpa` to keep transformers' own.

    `config_overrides` are applied to the model config (e.g. `use_cache: false`, `output_router_logits: true`).
    `gguf_file` names a GGUF file in the folder or repo, dequantised to `dtype` (automodel/models/gguf.py).
    """
    from safetensors import SafetensorError

    from automodel.models import families

    source = check_source(pretrained_model_name_or_path, MODEL_KEY, required_file=None if gguf_file else "config.json")
    if gguf_file is not None:
        source = gguf.dequantised_folder(source, gguf_file, revision, dtype=dtype)
    if attn_implementation == attention.AUTOMODEL_SDPA:
        attention.register()
    try:
        # Checkpoints of remote-code-only families load into native classes (automodel/models/families).
        model = families.from_pretrained(
            source, dict(dtype=parse_dtype(dtype), attn_implementation=attn_implementation,
                         trust_remote_code=trust_remote_code, revision=revision), config_overrides)
    except SafetensorError as err:  # a truncated or damaged weights file
        raise UserError(f"{MODEL_KEY}: {source}: damaged safetensors weights: {str(err).splitlines()[0]}") from err
    except (OSError, ValueError) as err:  # missing files, unknown architecture, remote code needed
        raise model_error(source, err) from err
    if attn_implementation is None and attention.use_automodel_sdpa(model):
        logger.debug("attention: %s (transformers chose sdpa)", attention.AUTOMODEL_SDPA)
    return model


def load_tokenizer(pretrained_model_name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                   key: str = "tokenizer.pretrained_model_name_or_path", **kwargs):
    """Load a tokenizer and make sure it can pad: unk if it has one, else eos (one info line says which)."""
    from transformers import AutoTokenizer

    source = check_source(pretrained_model_name_or_path, key)
    if kwargs.get("gguf_file") is not None:
        source = gguf.tokenizer_folder(source, kwargs.pop("gguf_file"), revision)
    if not trust_remote_code and "config" not in kwargs:
        from automodel.models import families

        kwargs["config"] = families.tokenizer_config(source, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision,
                                                  **kwargs)
    except OSError as err:
        if Path(source).exists():
            raise UserError(f"{key}: cannot load a tokenizer from {source}: {str(err).splitlines()[0]}") from err
        raise _hub_error(source, key, err) from err
    except ValueError as err:  # e.g. a folder without config.json: transformers cannot tell which tokenizer
        raise UserError(f"{key}: cannot load a tokenizer from {source}: {str(err).splitlines()[0]}") from err
    if tokenizer.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer of {source} has no EOS token; the model could not learn to stop")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so which token pads does not change results.
        fallback = "unk_token" if tokenizer.unk_token is not None else "eos_token"
        tokenizer.pad_token = getattr(tokenizer, fallback)
        logger.info("tokenizer has no pad token: padding with %s %r (id %d)", fallback.replace("_token", ""),
                    tokenizer.pad_token, tokenizer.pad_token_id)
    return tokenizer

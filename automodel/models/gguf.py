"""GGUF checkpoints (llama.cpp's format) as a model source, read through transformers' GGUF support.

`model.gguf_file` names the file inside `model.pretrained_model_name_or_path` (a local folder or a hub repo).
transformers dequantises the weights (whatever the quantisation: Q4_1, Q8_0, F16, ...) and builds the model,
its config and its tokenizer from the file's metadata, for every architecture it reads from GGUF. The trained
result is an ordinary safetensors model or adapter; the run's config.yaml records the GGUF base, so the commands
run after training find it (automodel/inference/sources.py).

Reading a GGUF file is slow (transformers parses its metadata, tokenizer included, in Python and dequantises every
tensor; docs/guides/llm/quality.md has the measured time), so the dequantised model and its tokenizer are saved
once as an ordinary HF folder in the cache, keyed by the file's SHA-256: `$AUTOMODEL_CACHE/gguf/<name>-<hash>/`
(default ~/.cache/automodel). Every later load reads that folder. The weights are stored in float32, which holds
every dequantised value exactly; a run in another dtype casts on load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from automodel.errors import UserError

logger = logging.getLogger(__name__)

CACHE_ENV = "AUTOMODEL_CACHE"  # the cache root the tokenized-data cache uses too (automodel/data/cache.py)

SUFFIX = ".gguf"
INSTALL = "pip install 'automodel[gguf]'"


def require_gguf_package(key: str) -> None:
    """transformers reads GGUF through the `gguf` package, an optional dependency of automodel."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"{key}: reading a GGUF file needs the gguf package, which is not installed: {INSTALL}")


def check_gguf_file(source: str, gguf_file: str, key: str = "model.gguf_file") -> str:
    """The file name to hand to transformers, checked: a `.gguf` name, present when `source` is a local folder."""
    if not isinstance(gguf_file, str) or not gguf_file.endswith(SUFFIX):
        raise UserError(f"{key}: expected the name of a {SUFFIX} file in the model folder or repo, got {gguf_file!r}")
    folder = Path(source)
    if folder.is_dir() and not (folder / gguf_file).is_file():
        present = ", ".join(sorted(gguf_files(folder))) or "none"
        raise UserError(f"{key}: {folder} has no {gguf_file} (GGUF files there: {present})")
    require_gguf_package(key)
    return gguf_file


def gguf_files(folder: Path) -> list[str]:
    return [path.name for path in folder.glob(f"*{SUFFIX}") if path.is_file()]


def single_gguf_file(folder: Path) -> str | None:
    """The GGUF file of a folder that holds exactly one and no HF config.json (a GGUF model folder), else None."""
    if (folder / "config.json").is_file():
        return None
    found = gguf_files(folder)
    return found[0] if len(found) == 1 else None


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "automodel")) / "gguf"


def dequantised_folder(source: str, gguf_file: str, revision: str | None = None,
                       key: str = "model.gguf_file") -> str:
    """An HF folder (config.json, model.safetensors, tokenizer) holding the GGUF file's model, made on first use."""
    check_gguf_file(source, gguf_file, key)
    path = local_gguf_path(source, gguf_file, revision, key)
    folder = cache_root() / f"{path.stem}-{file_sha256(path)[:16]}"
    if (folder / "config.json").is_file():
        logger.info("GGUF %s: reading its dequantised copy %s", gguf_file, folder)
        return str(folder)
    logger.info("GGUF %s: dequantising it once into %s (later runs read that folder)", path, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        write_dequantised(path, partial)
        os.replace(partial, folder)  # the folder appears complete or not at all
    except OSError:
        if not (folder / "config.json").is_file():  # not another process that finished first: a real error
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(folder)


def write_dequantised(path: Path, folder: Path) -> None:
    """The model as transformers reads it from `path`, saved as config.json + model.safetensors + tokenizer.

    transformers refuses `save_pretrained` on a model loaded from GGUF (it counts as quantised even once every
    tensor is dequantised), so the float weights are written with safetensors and the config without its
    quantisation entry; a tied output head is stored once, as the input embedding, the way save_pretrained does."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            raise UserError(f"model.gguf_file: {path.name}: tensor {name} was not dequantised ({tensor.dtype})")
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor.contiguous()
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)


def local_gguf_path(source: str, gguf_file: str, revision: str | None, key: str) -> Path:
    """The GGUF file on this machine: in the local folder, or downloaded from the hub repo (huggingface_hub cache)."""
    if Path(source).is_dir():
        return Path(source) / gguf_file
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, gguf_file, revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise UserError(f"{key}: could not get {gguf_file} from the hub repo '{source}' "
                        f"({str(err).splitlines()[0]}); the machine may be offline: use a local folder") from err


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()

"""GGUF checkpoints (llama.cpp's format) as a model source, read through transformers' GGUF support.

`model.gguf_file` names the file inside `model.pretrained_model_name_or_path` (a local folder or a hub repo).
transformers dequantises the weights (whatever the quantisation: Q4_1, Q8_0, F16, ...) and builds the model,
its config and its tokenizer from the file's metadata, for every architecture it reads from GGUF. The trained
result is an ordinary safetensors model or adapter; the run's config.yaml records the GGUF base, so the commands
run after training find it (automodel/inference/sources.py).

Reading a GGUF file is slow (transformers parses its metadata, tokenizer included, in Python and dequantises every
tensor; docs/guides/llm/quality.md has the measured time), so the dequantised model and its tokenizer are saved
once as an ordinary HF folder in the cache, keyed by the file's SHA-256: `$AUTOMODEL_CACHE/gguf/<name>-<hash>/`
(default ~/.cache/automodel). Every later load reads that folder, shard by shard like any sharded checkpoint. The
copy is written tensor by tensor (`write_dequantised`: peak memory about one tensor, not the model), in the dtype
the run loads the model in: float32 by default, which holds every dequantised value exactly (the folder name
above); a bfloat16 or float16 copy has its own folder (`<name>-<hash>-bfloat16/`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from automodel.errors import UserError

logger = logging.getLogger(__name__)

CACHE_ENV = "AUTOMODEL_CACHE"  # the cache root the tokenized-data cache uses too (automodel/data/cache.py)

SUFFIX = ".gguf"
INSTALL = "pip install 'automodel[gguf]'"
MAX_SHARD_SIZE = "5GB"  # huggingface_hub's default split, as the hub's checkpoints come
# A copy in float32 keeps today's folder name; other dtypes get their own folder.
DTYPE_SUFFIXES = {"float32": "", "bfloat16": "-bfloat16", "float16": "-float16"}
TOKENIZER_SUFFIX = "-tokenizer"


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


def dequantised_folder(source: str, gguf_file: str, revision: str | None = None, key: str = "model.gguf_file",
                       dtype=None) -> str:
    """An HF folder (config.json, safetensors weights, tokenizer) holding the GGUF file's model in `dtype`, made on
    first use and streamed tensor by tensor (`write_dequantised`)."""
    check_gguf_file(source, gguf_file, key)
    path = local_gguf_path(source, gguf_file, revision, key)
    weights_dtype = stored_dtype(dtype)
    folder = cache_root() / f"{copy_name(path)}{DTYPE_SUFFIXES[weights_dtype]}"
    with made_once(folder) as missing:
        if missing:
            logger.info("GGUF %s: dequantising it once, in %s, into %s (later runs read that folder)",
                        path, weights_dtype, folder)
            publish(folder, lambda partial: write_dequantised(path, partial, weights_dtype))
        else:
            logger.info("GGUF %s: reading its dequantised copy %s", gguf_file, folder)
    return str(folder)


def tokenizer_folder(source: str, gguf_file: str, revision: str | None = None, key: str = "model.gguf_file") -> str:
    """A folder holding the GGUF file's tokenizer: any dequantised copy made already (they all hold the same
    tokenizer), else one with only the config and the tokenizer, which needs no weight dequantised."""
    check_gguf_file(source, gguf_file, key)
    path = local_gguf_path(source, gguf_file, revision, key)
    name = copy_name(path)
    for suffix in (*DTYPE_SUFFIXES.values(), TOKENIZER_SUFFIX):
        if (cache_root() / f"{name}{suffix}" / "config.json").is_file():
            return str(cache_root() / f"{name}{suffix}")
    folder = cache_root() / f"{name}{TOKENIZER_SUFFIX}"
    with made_once(folder) as missing:
        if missing:
            publish(folder, lambda partial: write_config_and_tokenizer(path, partial, load_config(path)))
    return str(folder)


def copy_name(path: Path) -> str:
    return f"{path.stem}-{file_sha256(path)[:16]}"


def stored_dtype(dtype) -> str:
    """The dtype a copy is stored in (a name): the run's, float32 when it names none (every dequantised value
    exactly). `dtype` is a torch dtype or its name."""
    if dtype is None or dtype == "auto":
        return "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SUFFIXES:
        raise UserError(f"model.dtype: a GGUF file is dequantised to {', '.join(DTYPE_SUFFIXES)}, got {dtype!r}")
    return name


@contextlib.contextmanager
def made_once(folder: Path) -> Iterator[bool]:
    """Yields whether `folder` (a cache copy) is still to be made; while it is, holds a lock beside it, so that the
    processes of one machine (the ranks of a job, two jobs on the same file) make it once: the others wait for it
    and read it, instead of each dequantising the whole file at the same time."""
    if (folder / "config.json").is_file():
        yield False
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file(folder), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed holder's process ends
        yield not (folder / "config.json").is_file()


def lock_file(folder: Path) -> Path:
    """The lock `made_once` holds while `folder` is being made."""
    return folder.parent / f".{folder.name}.lock"


def publish(folder: Path, write) -> None:
    """Run `write(partial)` on a fresh folder beside `folder`, then rename it: the copy is complete or absent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        write(partial)
        os.replace(partial, folder)  # the folder appears complete or not at all
    except OSError:
        if not (folder / "config.json").is_file():  # not another process that finished first: a real error
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_config(path: Path):
    """The model config transformers builds from the file's metadata, without its quantisation entry (the copy
    holds plain float weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def write_config_and_tokenizer(path: Path, folder: Path, config) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)  # what from_pretrained derives for it
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)


def write_dequantised(path: Path, folder: Path, dtype: str = "float32",
                      max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """The GGUF file's model written into `folder` as safetensors shards in `dtype`, one tensor at a time.

    transformers' GGUF rules do the translation: its per-architecture tensor processor (Llama's Q/K reverse
    permutation, ...) and its GGUF -> HF name map, applied to the model built on the meta device; gguf's reader
    and dequantiser read each tensor from the mapped file. A tied output head is stored once, as the input
    embedding, the way save_pretrained does. Peak memory: about one dequantised tensor, plus the file's mapped
    pages (reclaimable). Architectures transformers reads through its newer conversion pipeline instead
    (`GGUF_ARCHS`) are loaded whole by from_pretrained, as before."""
    import torch
    from transformers import CONFIG_MAPPING
    from transformers.integrations.gguf import read_gguf_metadata
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    dtype = getattr(torch, dtype)
    architecture = read_gguf_metadata(str(path))[0]["general.architecture"]  # its fast reader, no token lists
    if architecture in GGUF_ARCHS:
        logger.info("GGUF %s: transformers converts %s files whole; dequantising the model in memory", path.name,
                    architecture)
        write_dequantised_whole(path, folder, dtype, load_config(path))
        return
    # The metadata as transformers' GGUF reader turns it into a config dict (the one its tensor processors are
    # given); AutoConfig builds the model config from that dict the same way (parsing the metadata once more
    # would take longer than dequantising a small model).
    config_dict = load_gguf_checkpoint(str(path))["config"]
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(dict(config_dict))
    stream_tensors(architecture, path, folder, dtype, config, config_dict, max_shard_size)
    config.dtype = dtype
    write_config_and_tokenizer(path, folder, config)


def stream_tensors(architecture: str, path: Path, folder: Path, dtype, config, config_dict: dict,
                   max_shard_size: int | str) -> None:
    """Dequantise, translate and write the file's tensors one at a time (see write_dequantised)."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from automodel.models.safetensors_writer import ShardedSafetensorsWriter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
    hf_names = get_gguf_hf_weights_map(model, processor)
    writer = ShardedSafetensorsWriter(folder, planned_tensors(model, dtype), max_shard_size)
    # Processors that assemble a tensor from several of the file's (MoE experts) leave it here; it is
    # complete once the file moves on to the next block.
    assembled = {"config": processor.config, "tensors": {}}
    block, skipped = None, []
    for tensor in GGUFReader(path).tensors:
        if tensor.name.split(".")[:2] != block:
            write_assembled(writer, assembled["tensors"])
            block = tensor.name.split(".")[:2]
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=hf_names,
                                   parsed_parameters=assembled)
        if result.name is None:
            continue
        if result.name not in hf_names:
            skipped.append(result.name)
            continue
        writer.write(hf_names[result.name], torch.from_numpy(np.require(result.weights, requirements="W")))
        del weights, result
    write_assembled(writer, assembled["tensors"])
    if skipped:
        logger.debug("GGUF %s: tensors the model has no place for (as transformers skips them): %s", path.name,
                     ", ".join(skipped))
    if writer.missing():
        raise UserError(f"model.gguf_file: {path.name} holds no tensor for {len(writer.missing())} of the model's "
                        f"weights ({', '.join(writer.missing()[:3])}, ...)")
    writer.write_index()


def write_assembled(writer, tensors: dict) -> None:
    while tensors:
        name, tensor = tensors.popitem()
        writer.write(name, tensor)


def planned_tensors(model, dtype) -> dict:
    """Name -> meta tensor of every weight the copy stores: each tensor once (a tied head is the embedding)."""
    import torch

    planned, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        planned[name] = torch.empty(tensor.shape, dtype=dtype, device="meta")
    return planned


def write_dequantised_whole(path: Path, folder: Path, dtype, config) -> None:
    """transformers' own from_pretrained, whole model in memory: for the files its newer GGUF pipeline reads.

    transformers refuses `save_pretrained` on a model loaded from GGUF (it counts as quantised even once every
    tensor is dequantised), so the float weights are written with safetensors."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    state = {name: tensor.contiguous() for name, tensor in planned_state(model).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = dtype
    write_config_and_tokenizer(path, folder, config)


def planned_state(model) -> dict:
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            raise UserError(f"model.gguf_file: tensor {name} was not dequantised ({tensor.dtype})")
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor
    return state


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

"""The weight files of a Hugging Face model folder, checked before anything is allocated or written.

Two safetensors layouts are read: one `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` listed by
`model.safetensors.index.json`. Each file's header is read (the JSON the format puts before the data: names,
dtypes, shapes) to catch a checkpoint that cannot load, with one line naming the file and tensor, before any
process allocates memory: shards and index that disagree, a missing shard, a dtype no float parameter can be read
from, a shape the model does not have. `.bin` pickles (`pytorch_model.bin` or shards with their index) are accepted
only when `torch.load(weights_only=True)` reads them (no code runs on load); they are memory-mapped, so listing
their tensors reads no data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from automodel.errors import UserError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# safetensors dtype names a floating-point parameter can be filled from (a copy casts to the training dtype).
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
SAFE_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
# fp8 weights of a checkpoint transformers dequantises on load (models/conversion.py's fp8_dequantizer)
TORCH_DTYPES = {**{name: dtype for dtype, name in SAFE_DTYPES.items()}, "F8_E4M3": torch.float8_e4m3fn}
HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header


@dataclass
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class WeightFiles:
    """A model folder's weight files and every tensor in them (from safetensors headers or mmapped pickles)."""

    folder: Path
    files: list[Path]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    format: str = "safetensors"  # or "bin"


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file (8-byte little-endian length, then the JSON)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > HEADER_LIMIT:
                raise ValueError(f"header length {length} is not plausible")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise UserError(f"model weights: {path} is not a readable safetensors file ({err})") from err
    header.pop("__metadata__", None)
    return header


def _shard_files(folder: Path) -> list[Path]:
    """The files the index names, each checked to exist; a safetensors file it does not name is an error too."""
    index_path = folder / SAFE_INDEX
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"model weights: {index_path} is not a safetensors index (expected a weight_map)") from err
    files = sorted(set(weight_map.values()))
    for name in files:
        if not (folder / name).is_file():
            tensor = next(t for t, f in weight_map.items() if f == name)
            raise UserError(f"model weights: {folder / name} is missing (the index puts {tensor} in it)")
    unlisted = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in weight_map.values())
    if unlisted:
        raise UserError(f"model weights: {folder / unlisted[0]} is not listed in {index_path}: remove it or fix "
                        "the index")
    return [folder / name for name in files]


def find_safetensors(folder: Path) -> WeightFiles | None:
    """The folder's safetensors checkpoint with every tensor's file, dtype and shape; None when it has none."""
    if (folder / SAFE_INDEX).is_file():
        files = _shard_files(folder)
        expected = json.loads((folder / SAFE_INDEX).read_text())["weight_map"]
    elif (folder / SAFE_SINGLE).is_file():
        files, expected = [folder / SAFE_SINGLE], None
    else:
        return None
    checkpoint = WeightFiles(folder, files)
    for path in files:
        for name, info in read_header(path).items():
            if name in checkpoint.tensors:
                raise UserError(f"model weights: {name} is in both {checkpoint.tensors[name].file} and {path}")
            if expected is not None and expected.get(name) != path.name:
                raise UserError(f"model weights: {path} holds {name}, but {SAFE_INDEX} puts it in "
                                f"{expected.get(name, 'no file')}")
            checkpoint.tensors[name] = TensorEntry(path, info.get("dtype"), tuple(info.get("shape", ())))
    if expected is not None:
        absent = sorted(set(expected) - set(checkpoint.tensors))
        if absent:
            raise UserError(f"model weights: {folder / expected[absent[0]]} lacks {absent[0]}, which "
                            f"{SAFE_INDEX} puts there")
    return checkpoint


def check_matches_model(checkpoint: WeightFiles, wanted: dict[str, tuple[tuple[int, ...], bool]]) -> None:
    """Every tensor the model loads is present with its shape and a readable dtype. `wanted`: {name: (shape,
    is floating point)}."""
    for name, (shape, floating) in wanted.items():
        entry = checkpoint.tensors.get(name)
        if entry is None:
            raise UserError(f"model weights: {checkpoint.folder} has no tensor {name} (looked in "
                            f"{', '.join(p.name for p in checkpoint.files)})")
        if floating and entry.dtype not in FLOAT_DTYPES:
            raise UserError(f"model weights: {entry.file} stores {name} as {entry.dtype!r}; expected one of "
                            f"{', '.join(sorted(FLOAT_DTYPES))}")
        if entry.shape != tuple(shape):
            raise UserError(f"model weights: {entry.file} stores {name} with shape {list(entry.shape)}; the model's "
                            f"config gives {list(shape)}")


def _bin_files(folder: Path) -> list[Path]:
    if (folder / BIN_INDEX).is_file():
        try:
            weight_map = json.loads((folder / BIN_INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"model weights: {folder / BIN_INDEX} is not a weights index (expected a weight_map)"
                            ) from err
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (folder / name).is_file():
                raise UserError(f"model weights: {folder / name} is missing (listed in {folder / BIN_INDEX})")
        return [folder / name for name in names]
    return [folder / BIN_SINGLE] if (folder / BIN_SINGLE).is_file() else []


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` file's tensors, memory-mapped; a UserError when it needs more than `weights_only` allows."""
    try:
        state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as err:  # any failure means the pickle needs more than tensors: refuse it
        raise UserError(f"model weights: {path} does not load with weights_only=True ({type(err).__name__}); "
                        "convert it to safetensors") from err
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"model weights: {path} is not a state dict of tensors; convert it to safetensors")
    return state


def find_bin(folder: Path) -> WeightFiles | None:
    """The folder's `.bin` weights, each file checked to load with `weights_only=True`; None when it has none."""
    files = _bin_files(folder)
    if not files:
        return None
    weights = WeightFiles(folder, files, format="bin")
    for path in files:
        for name, tensor in load_bin(path).items():
            if name in weights.tensors:
                raise UserError(f"model weights: {name} is in both {weights.tensors[name].file} and {path}")
            weights.tensors[name] = TensorEntry(path, SAFE_DTYPES.get(tensor.dtype, str(tensor.dtype)),
                                                tuple(tensor.shape))
    return weights

"""Safetensors shards written one tensor at a time, for a model produced tensor by tensor (a GGUF file's).

`safetensors.torch.save_file` takes a whole state dict and copies every tensor to bytes before writing, so a
shard costs twice its size in memory; dequantising a 7B GGUF that way holds the model. Here the layout (names,
dtypes, shapes, shards) is planned first from the model built on the meta device, each shard's header is
written up front, and every tensor is written at its offset as soon as it exists and then dropped. The files are
ordinary safetensors files (the format is a length, a JSON header and the raw little-endian bytes), split and
indexed by huggingface_hub's rules, the ones `save_pretrained` uses.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from huggingface_hub import constants, split_state_dict_into_shards_factory

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
HEADER_ALIGNMENT = 8  # the format pads the header so that the data starts 8-byte aligned


class ShardedSafetensorsWriter:
    """Write `planned` tensors (name -> meta tensor of the stored dtype and shape) into `folder`, in any order."""

    def __init__(self, folder: Path, planned: dict[str, torch.Tensor], max_shard_size: int | str = "5GB"):
        for name, tensor in planned.items():
            if tensor.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: cannot store {tensor.dtype}")
        self.folder, self.planned = folder, planned
        self.split = split_state_dict_into_shards_factory(
            planned, get_storage_size=lambda t: t.numel() * t.element_size(),
            filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN, max_shard_size=max_shard_size)
        self.where: dict[str, tuple[Path, int]] = {}  # name -> (file, offset of its bytes)
        for filename, names in self.split.filename_to_tensors.items():
            self._write_header(folder / filename, names)
        self.written: set[str] = set()

    def _write_header(self, path: Path, names: list[str]) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            tensor = self.planned[name]
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
        start = 8 + len(encoded)
        with path.open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            handle.truncate(start + offset)  # the file has its final size; tensors fill it in
        for name in names:
            self.where[name] = (path, start + header[name]["data_offsets"][0])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store `tensor` as `name` (cast to the planned dtype; its shape must be the planned one)."""
        planned = self.planned.get(name)
        if planned is None:
            raise KeyError(name)
        if tuple(tensor.shape) != tuple(planned.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(planned.shape)}")
        data = tensor.detach().to(planned.dtype).contiguous()
        path, offset = self.where[name]
        with path.open("r+b") as handle:
            handle.seek(offset)
            handle.write(data.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's own bytes, not a copy
        self.written.add(name)

    def missing(self) -> list[str]:
        return [name for name in self.planned if name not in self.written]

    def write_index(self) -> None:
        """`model.safetensors.index.json` when the model spans several shards (as save_pretrained writes it)."""
        if not self.split.is_sharded:
            return
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in self.planned.values())},
                 "weight_map": self.split.tensor_to_filename}
        (self.folder / constants.SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

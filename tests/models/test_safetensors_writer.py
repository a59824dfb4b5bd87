"""Safetensors shards written tensor by tensor (automodel/models/safetensors_writer.py), read back by safetensors
and by transformers as an ordinary sharded checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from automodel.models.safetensors_writer import ShardedSafetensorsWriter


def test_tensors_written_in_any_order_read_back_as_sharded_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(64, 48 + i) for i in range(6)}
    tensors["norm.weight"] = torch.randn(7)
    planned = {name: torch.empty(t.shape, dtype=torch.bfloat16, device="meta") for name, t in tensors.items()}
    writer = ShardedSafetensorsWriter(tmp_path, planned, max_shard_size=15_000)
    for name in reversed(tensors):  # not the planned order: every tensor lands at its own offset
        writer.write(name, tensors[name])
    assert writer.missing() == []
    writer.write_index()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    read = {}
    for shard in shards:
        read.update(load_file(tmp_path / shard))
    assert read.keys() == tensors.keys()
    assert all(torch.equal(read[k], tensors[k].bfloat16()) for k in tensors)


def test_a_single_shard_has_no_index_and_a_wrong_shape_is_refused(tmp_path):
    planned = {"w": torch.empty(3, 4, device="meta"), "b": torch.empty(4, device="meta")}
    writer = ShardedSafetensorsWriter(tmp_path, planned)
    writer.write("w", torch.arange(12.0).reshape(3, 4))
    with pytest.raises(ValueError, match=r"b: shape \(5,\), expected \(4,\)"):
        writer.write("b", torch.zeros(5))
    assert writer.missing() == ["b"]
    writer.write("b", torch.ones(4))
    writer.write_index()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    read = load_file(tmp_path / "model.safetensors")
    assert torch.equal(read["w"], torch.arange(12.0).reshape(3, 4)) and torch.equal(read["b"], torch.ones(4))

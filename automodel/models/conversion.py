"""Checkpoints whose tensor names transformers converts (fused MoE experts, split or renamed weights, the remote-code
families of automodel/models/families), read and written one conversion group at a time.

transformers' `from_pretrained` and `save_pretrained` convert the whole state dict at once. Here the same conversions
(transformers' own mapping for the model, `get_model_conversion_mapping`, and its own ops) are grouped the way
transformers groups them (one group per converted parameter: for a fused expert tensor, every expert's source
tensor), and each group is realised on its own: its source tensors are read (loading) or gathered (saving), converted,
used and dropped before the next group. So the most any process holds beyond its shards is one group in full: one
layer's fused expert projection for an MoE model, one weight elsewhere.

A fine-grained fp8 checkpoint (DeepSeek-V3's format) adds transformers' fp8 dequantisation as the first op of
each group (`fp8_dequantizer`): its weights and block scales are read together and come out as float tensors.

We drive transformers' grouping ourselves rather than calling `convert_and_load_state_dict_in_model`, because that
function slices each source tensor to the destination's shard *before* converting: exact for the expert lists it
was written for, wrong for a split (a shard of a fused qkv is not a shard of q) and for FSDP2's dim-0 shards of a
concatenation.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

import torch
from torch import nn

from automodel.errors import UserError
from automodel.models.weights import FLOAT_DTYPES, TORCH_DTYPES, load_bin


def fp8_dequantizer(quantization_config):
    """transformers' quantizer of a fine-grained fp8 checkpoint (`quant_method: fp8`, as DeepSeek-V3 and the -FP8
    releases ship: fp8 weights with per-block `weight_scale_inv`), set to dequantise as it loads, which is what
    training needs; None for any other quantisation."""
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)
    if not isinstance(quantizer, FineGrainedFP8HfQuantizer):
        return None
    quantizer.quantization_config.dequantize = True
    return quantizer


def _transforms(model: nn.Module, reverse: bool, dequantizer=None):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    if reverse:  # as transformers' revert_weight_conversion on a model not loaded by from_pretrained
        found = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
        found = [c.reverse_transform() for c in found[::-1]]
    else:  # a dequantiser adds its own ops before the model's (fp8 weights and scales in, float weights out)
        found = get_model_conversion_mapping(model, hf_quantizer=dequantizer)
    renamings = [c for c in found if isinstance(c, WeightRenaming)]
    converters = [c for c in found if isinstance(c, WeightConverter)]
    return renamings, converters


def has_conversions(model: nn.Module) -> bool:
    """True when transformers renames or converts this model's tensors between the checkpoint and the modules."""
    renamings, converters = _transforms(model, reverse=True)
    return bool(renamings or converters)


def load_groups(model: nn.Module, source_names: list[str], target_names: set[str],
                read: Callable[[str], Callable[[], torch.Tensor]], dequantizer=None) -> tuple[dict, list[str]]:
    """({first target name: transform holding its sources' readers}, checkpoint names no target uses), grouped as
    transformers' `convert_and_load_state_dict_in_model` groups them. `read(name)` returns a reader of that
    checkpoint tensor (called only when the group is realised)."""
    from transformers.core_model_loading import WeightRenaming, dot_natural_key, rename_source_key

    renamings, converters = _transforms(model, reverse=False, dequantizer=dequantizer)
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    targets = dict.fromkeys(target_names, True)  # rename_source_key asks `.get(name) is not None`
    prefix = model.base_model_prefix
    groups, unused = {}, []
    for source in sorted(source_names, key=dot_natural_key):
        target, pattern = rename_source_key(source, renamings, converters, prefix, targets)
        if target not in targets and source in targets:
            target, pattern = rename_source_key(source, [], [], prefix, targets)
        if target not in targets:
            unused.append(source)
            continue
        group = groups.setdefault(target, deepcopy(by_pattern[pattern]) if pattern else WeightRenaming(source, target))
        group.add_tensor(target, source, pattern or source, read(source))
    return groups, unused


def save_groups(model: nn.Module, names: list[str], read: Callable[[str], Callable[[], torch.Tensor]]
                ) -> tuple[dict, list]:
    """({first saved name: transform holding its model tensors' readers}, the renamings `realise` applies to a
    converter's outputs), grouped as transformers' `revert_weight_conversion` groups them."""
    from transformers.core_model_loading import (
        WeightRenaming,
        apply_converters,
        apply_renamings,
        dot_natural_key,
    )

    renamings, converters = _transforms(model, reverse=True)
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    groups = {}
    for name in sorted(names, key=dot_natural_key):
        saved, pattern = apply_converters(name, converters)
        if pattern is None:
            saved = apply_renamings(name, renamings)
            groups[saved] = WeightRenaming(name, saved)
        else:
            groups.setdefault(saved, deepcopy(by_pattern[pattern]))
        groups[saved].add_tensor(saved, name, pattern or name, read(name))
    return groups, renamings


def realise(first: str, group, model: nn.Module, renamings=()) -> dict[str, torch.Tensor]:
    """The group's converted tensors by name (its readers are called here). `renamings`: the saving direction's,
    applied to a converter's outputs as `revert_weight_conversion` applies them."""
    from transformers.core_model_loading import WeightConverter, apply_renamings

    values = group.convert(first, model=model, config=model.config)
    out = {}
    for name, value in values.items():
        if isinstance(group, WeightConverter) and renamings:
            name = apply_renamings(name, list(renamings))
        out[name] = value[0] if isinstance(value, list) else value
    return out


class TensorReaders:
    """Readers of a checkpoint's tensors, one file opened (safetensors' mmap, or an mmapped `.bin`) when first
    needed; `meta=True` gives shape-only tensors for a dry run that reads no data. The tensors read are views of
    the file's mapping, whose pages stay in the process's resident set until the file is closed: `close()` after
    each group keeps that to one group's pages."""

    def __init__(self, weights, meta: bool = False):
        self.weights, self.meta, self.opened = weights, meta, {}

    def _file(self, path):
        if path not in self.opened:
            if self.weights.format == "bin":
                self.opened[path] = load_bin(path)
            else:
                from safetensors import safe_open

                self.opened[path] = safe_open(str(path), framework="pt")
        return self.opened[path]

    def close(self) -> None:
        self.opened.clear()

    def reader(self, name: str) -> Callable[[], torch.Tensor]:
        entry = self.weights.tensors[name]
        if self.meta:
            if entry.dtype not in TORCH_DTYPES:
                raise UserError(f"model weights: {entry.file} stores {name} as {entry.dtype!r}, which automodel "
                                f"cannot read; expected one of {', '.join(sorted(FLOAT_DTYPES))}")
            return lambda: torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype], device="meta")
        if self.weights.format == "bin":
            return lambda: self._file(entry.file)[name]
        return lambda: self._file(entry.file).get_tensor(name)


def check_converted(model: nn.Module, weights, wanted: dict[str, tuple[tuple[int, ...], bool]],
                    dequantizer=None) -> None:
    """A dry run of the conversion on shape-only tensors: every tensor the model loads is produced once, with its
    shape and a float dtype where it is a float, before any memory is allocated; else one line naming it."""
    groups, _ = load_groups(model, list(weights.tensors), set(wanted), TensorReaders(weights, meta=True).reader,
                            dequantizer)
    produced = {}
    for first, group in groups.items():
        sources = sorted({s for names in group.layer_targets.values() for s in names})
        where = weights.tensors[sources[0]].file
        try:
            values = realise(first, group, model)
        except (RuntimeError, ValueError, IndexError) as err:
            raise UserError(f"model weights: {where}: {', '.join(sources[:3])} cannot be converted to {first} "
                            f"({str(err).splitlines()[0]})") from err
        for name, value in values.items():
            shape, floating = wanted.get(name, (None, None))
            if shape is None:
                continue
            if tuple(value.shape) != tuple(shape):
                raise UserError(f"model weights: {where}: {', '.join(sources[:3])} give {name} the shape "
                                f"{list(value.shape)}; the model's config gives {list(shape)}")
            if floating and not value.is_floating_point():
                raise UserError(f"model weights: {where} stores {sources[0]} as {value.dtype}; {name} needs floats")
            produced[name] = where
    missing = sorted(set(wanted) - set(produced))
    if missing:
        raise UserError(f"model weights: {weights.folder} has no tensor {missing[0]} (looked in "
                        f"{', '.join(p.name for p in weights.files)})")


def load_converted_weights(base_model: nn.Module, weights, targets: dict[str, torch.Tensor], dequantizer=None
                           ) -> list[str]:
    """Every process reads the checkpoint one conversion group at a time and keeps its own slices of each result
    (`targets`: {name: this process's tensor}); returns the checkpoint's tensors no parameter uses."""
    from automodel.models.materialize import copy_into

    readers = TensorReaders(weights)
    groups, unused = load_groups(base_model, list(weights.tensors), set(targets), readers.reader, dequantizer)
    for first, group in groups.items():
        for name, value in realise(first, group, base_model).items():
            if name in targets:
                copy_into(targets[name], value)
        readers.close()
    return unused

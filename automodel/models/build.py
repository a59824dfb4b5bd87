"""The configured model, built so that no process holds more of it than its share.

`build_model(cfg, parallel)` needs no recipe and no process group (`automodel export` calls it with
`parallel=None`). For a checkpoint folder (safetensors in the hub's layouts, or `.bin` pickles that load with
`weights_only`) it:
  1. builds the model from its config on the meta device (no memory),
  2. applies LoRA there (the adapters' initial values are recomputed exactly as peft drew them),
  3. applies the parallel plan that splits parameters (tensor parallel, FSDP2),
  4. allocates only this process's shards and reads them from the checkpoint: by torch.distributed.checkpoint when
     the checkpoint's names are the model's (models/materialize.py), else one conversion group at a time through
     transformers' own conversions (models/conversion.py: fused MoE experts, the remote-code families' layouts,
     fp8 weights dequantised),
     then computes DoRA's magnitudes from the loaded weights, one layer at a time (models/dora.py),
  5. computes the buffers the checkpoint does not store and wraps DDP last (it needs real parameters).
A GGUF file is read from its dequantised copy (models/gguf.py), an ordinary safetensors folder. Other sources (a
custom `model._target_`, a checkpoint of another quantisation than fp8) load whole through transformers in each
process, as one info line says. A QLoRA base (one process) is built on the meta device too and quantised one
tensor at a time as it is read (models/quantized.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automodel.config import TargetPolicy, build, parse_section
from automodel.config.precision import Precision
from automodel.errors import UserError
from automodel.models import attention, families, gguf
from automodel.models.conversion import check_converted, fp8_dequantizer, load_converted_weights
from automodel.models.dora import fill_dora_magnitudes
from automodel.models.loader import MODEL_KEY, check_source, model_error, parse_dtype, resolve_model_folder
from automodel.models.materialize import (
    check_materialized,
    checkpoint_targets,
    fill_from_full,
    init_non_persistent_buffers,
    load_checkpoint_weights,
    lora_initial_values,
    loaded_names,
    module_registrations,
)
from automodel.models.quantized import build_quantized_on_meta
from automodel.models.unwrap import transformers_model
from automodel.models.weights import WeightFiles, check_matches_model, find_bin, find_safetensors
from automodel.peft import LoraSettings

logger = logging.getLogger("automodel")

LOAD_CAUSAL_LM = "automodel.models.load_causal_lm"
LOADER_OPTIONS = ("pretrained_model_name_or_path", "dtype", "attn_implementation", "trust_remote_code", "revision")


def model_section(cfg: dict[str, Any]) -> dict[str, Any]:
    node = dict(cfg.get("model") or {})
    node.setdefault("_target_", LOAD_CAUSAL_LM)
    return node


def lora_settings(cfg: dict[str, Any]) -> LoraSettings | None:
    return parse_section(LoraSettings, cfg["peft"], "peft") if cfg.get("peft") is not None else None


FROM_CFG: Any = object()  # build_model's `lora` when the caller has not parsed the `peft` section itself


def build_model(cfg: dict[str, Any], parallel=None, device: torch.device | None = None,
                policy: TargetPolicy = TargetPolicy(), precision: Precision | None = None,
                lora: LoraSettings | None = FROM_CFG) -> nn.Module:
    """The model of `cfg` (LoRA applied when `peft` is set), spread over `parallel`'s processes when given, its
    weights built in `precision.weights_dtype` (default: `parallel`'s; without either, `model.dtype`, else float32;
    peft keeps the adapters of a bf16 base in float32). A `model._target_` other than automodel's loader must come
    from a package `policy` trusts. `lora`: the `peft` section already parsed (a recipe's settings), else it is
    read from `cfg`."""
    device = parallel.device if parallel is not None else (device or torch.device("cpu"))
    node = model_section(cfg)
    lora = lora_settings(cfg) if lora is FROM_CFG else lora
    precision = precision or (parallel.precision if parallel is not None else None)
    if precision is not None and node["_target_"] == LOAD_CAUSAL_LM:
        node["dtype"] = precision.weights_dtype
    model = _build(node, lora, parallel, device, policy)
    if lora is not None and precision is not None and precision.mixed:
        adapters_take_autocast_inputs(model)
    return model


def adapters_take_autocast_inputs(model: nn.Module) -> None:
    """Under mixed precision every forward of the training model runs in autocast, which casts the float32 adapter
    weights to bf16 for their matmuls (once per forward: autocast caches leaf weights). peft would first cast each
    adapted layer's bf16 input to float32 (a full-size copy per layer, and autocast's cast back): its documented
    switch (`cast_input_dtype_enabled`, see peft.helpers.disable_input_dtype_casting) lets the input through."""
    for module in model.modules():
        if hasattr(module, "_cast_input_dtype"):
            module.cast_input_dtype_enabled = False


def _build(node: dict[str, Any], lora: LoraSettings | None, parallel, device: torch.device,
           policy: TargetPolicy) -> nn.Module:
    if lora is not None and lora.quantization is not None:
        return build_quantized(node, lora, parallel, device, policy)
    if node["_target_"] == LOAD_CAUSAL_LM:
        options = {k: v for k, v in node.items() if k != "_target_"}
        if options.get("gguf_file"):  # read from its dequantised copy, an ordinary safetensors folder (gguf.py)
            source = check_source(options["pretrained_model_name_or_path"], MODEL_KEY)
            options["pretrained_model_name_or_path"] = gguf.dequantised_folder(
                source, options.pop("gguf_file"), options.pop("revision", None), dtype=options.get("dtype"))
        folder = resolve_model_folder(options.get("pretrained_model_name_or_path"), options.get("revision"))
        weights = find_safetensors(folder) or find_bin(folder)
        if weights is not None:
            model = build_on_meta(options, weights, lora, parallel, device)
            if model is not None:
                return model
        else:
            logger.info("model: %s holds no safetensors or .bin weights: each process loads the whole model", folder)
    else:
        logger.info("model: %s builds the model: each process loads the whole model", node["_target_"])
    return build_in_full(node, lora, parallel, device, policy)


def build_in_full(node: dict[str, Any], lora: LoraSettings | None, parallel, device: torch.device,
                  policy: TargetPolicy = TargetPolicy()) -> nn.Module:
    """Every process loads the whole model through the configured builder, then it is split."""
    model = build(node, "model", policy=policy)
    if not isinstance(model, nn.Module):
        raise UserError(f"model._target_ returned {type(model).__name__}, expected a torch.nn.Module")
    if lora is not None:
        model = lora.apply(model)
    model = model.to(device)
    return parallel.parallelize(model) if parallel is not None else model


def build_quantized(node: dict[str, Any], lora: LoraSettings, parallel, device: torch.device,
                    policy: TargetPolicy = TargetPolicy()) -> nn.Module:
    """QLoRA: the base in 4 bits (bitsandbytes) on this process's device: built on the meta device and quantised
    tensor by tensor (models/quantized.py) from a safetensors folder whose names are the model's, else loaded whole
    by transformers."""
    lora.quantization.check_device(device, parallel.world_size if parallel is not None else 1)
    model = quantized_on_meta(node, lora, device)
    if model is None:
        logger.info("model: QLoRA: transformers loads the whole base model in 4 bits onto this device")
        model = build(node, "model", policy=policy, quantization_config=lora.quantization.bnb_config(),
                      device_map={"": device})
    if not isinstance(model, nn.Module):
        raise UserError(f"model._target_ returned {type(model).__name__}, expected a torch.nn.Module")
    model = lora.apply(model)
    return parallel.parallelize(model) if parallel is not None else model


def quantized_on_meta(node: dict[str, Any], lora: LoraSettings, device: torch.device) -> nn.Module | None:
    """The 4-bit base built on the meta device, or None where that path does not apply: a custom builder, a GGUF
    file, no safetensors, a quantised checkpoint, names that transformers converts on load."""
    options = {k: v for k, v in node.items() if k != "_target_"}
    if node["_target_"] != LOAD_CAUSAL_LM or options.get("gguf_file"):
        return None
    folder = resolve_model_folder(options.get("pretrained_model_name_or_path"), options.get("revision"))
    weights = find_safetensors(folder)
    built = meta_model(options, folder) if weights is not None else None
    if built is None or built[1] is not None or not set(loaded_names(built[0])) <= set(weights.tensors):
        return None
    return build_quantized_on_meta(built[0], weights, lora.quantization.bnb_config(), device)


def meta_model(options: dict[str, Any], folder: Path):
    """(the model of the folder's config (with the section's overrides), its parameters on the meta device; the
    dequantiser of an fp8 checkpoint or None); None for other quantised checkpoints (`quantization_config`), which
    transformers' own loading reads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = {k: v for k, v in options.items() if k not in LOADER_OPTIONS}
    trust = bool(options.get("trust_remote_code", False))
    attn = options.get("attn_implementation")
    dtype = parse_dtype(options.get("dtype", "float32"))
    if attn == attention.AUTOMODEL_SDPA:
        attention.register()
    try:
        config, published, family_class = families.meta_config(folder, trust, overrides)
        if config is None:
            config, unused = AutoConfig.from_pretrained(folder, trust_remote_code=trust, return_unused_kwargs=True,
                                                        **overrides)
            if unused:  # transformers would drop them; the whole-model load refuses them too
                raise UserError(f"model.{next(iter(unused))}: {type(config).__name__} has no such setting; remove "
                                "the key or name one of the model config's fields")
        dequantizer = None
        if getattr(config, "quantization_config", None) is not None:
            dequantizer = fp8_dequantizer(config.quantization_config)
            if dequantizer is None:
                return None
            del config.quantization_config  # the model trains and is saved in float
        stored_dtype = getattr(config, "dtype", None)
        with torch.device("meta"):
            if family_class is not None:
                model = family_class._from_config(config, dtype=dtype, attn_implementation=attn)
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn,
                                                         trust_remote_code=trust)
        keep_stored_dtype(model, stored_dtype, dtype)
    except (OSError, ValueError) as err:
        raise model_error(str(folder), err) from err
    if published is not None:
        families.mark_published(model, published)
    if attn is None:
        attention.use_automodel_sdpa(model)
    return model, dequantizer


def keep_stored_dtype(model: nn.Module, stored: torch.dtype | str | None, built: torch.dtype) -> None:
    """The config keeps the checkpoint's own dtype (transformers sets the build's), so a saved `model/` follows the
    checkpoint's convention whatever the run computed in (checkpoint/hf_writer.py casts to it)."""
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if not isinstance(stored, torch.dtype) or not stored.is_floating_point:
        return
    if stored == torch.float16 and built == torch.bfloat16:
        logger.info("model: the checkpoint stores float16 weights; they are read into bfloat16 (same exponent range "
                    "as float32, 3 fewer mantissa bits) and a saved model/ is written back in float16")
    model.config.dtype = stored


def build_on_meta(options: dict[str, Any], weights: WeightFiles, lora: LoraSettings | None, parallel,
                  device: torch.device) -> nn.Module | None:
    """Steps 1-5 of the module docstring; None for a quantised checkpoint (transformers' loading reads those)."""
    built = meta_model(options, weights.folder)
    if built is None:
        logger.info("model: %s is quantised (quantization_config): each process loads the whole model through "
                    "transformers", weights.folder)
        return None
    model, dequantizer = built
    wanted = loaded_names(model)
    same_names = weights.format == "safetensors" and set(wanted) <= set(weights.tensors) and dequantizer is None
    if same_names:
        check_matches_model(weights, wanted)
    else:  # names transformers converts (fused experts, a family's layout, fp8 weights), .bin: group by group
        check_converted(model, weights, wanted, dequantizer)
    logger.info("model: built on the meta device; each process reads its shard of %s (%d %sfiles%s)",
                weights.folder, len(weights.files), ".bin " if weights.format == "bin" else "",
                "" if same_names else ", one conversion group at a time")
    lora_values = {}
    if lora is not None:
        rng_before = torch.get_rng_state()
        with module_registrations() as attached:
            model = lora.apply(model)
        lora_values = lora_initial_values(model, rng_before, attached)
    if parallel is not None:
        model = parallel.shard(model)
    model.to_empty(device=device)
    hf = transformers_model(model)
    hf.tie_weights()
    if same_names:
        load_checkpoint_weights(model, weights.folder, set(wanted), peft=lora is not None)
    else:
        unused = load_converted_weights(hf, weights, checkpoint_targets(model, set(wanted), lora is not None),
                                        dequantizer)
        if unused:
            logger.info("model: %d checkpoint tensors load into no parameter (first: %s)", len(unused), unused[0])
    fill_from_full(model, lora_values)
    if lora is not None and lora.use_dora:
        fill_dora_magnitudes(model, lora_values)
    init_non_persistent_buffers(hf)
    check_materialized(model)
    return parallel.replicate(model) if parallel is not None else model

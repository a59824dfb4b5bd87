"""The configured model, built so that no process holds more of it than its share.

`build_model(cfg, parallel)` needs no recipe and no process group (`automodel export` calls it with
`parallel=None`). For a safetensors checkpoint (the hub's layouts) it:
  1. builds the model from its config on the meta device (no memory),
  2. applies LoRA there (the adapters' initial values are recomputed exactly as peft drew them),
  3. applies the parallel plan that splits parameters (tensor parallel, FSDP2),
  4. allocates only this process's shards and reads them from the checkpoint (models/materialize.py),
     then computes DoRA's magnitudes from the loaded weights, one layer at a time (models/dora.py),
  5. computes the buffers the checkpoint does not store and wraps DDP last (it needs real parameters).
Other sources (a custom `model._target_`, a GGUF file, `.bin` weights, names transformers converts on load) load whole
through transformers in each process, as one info line says; so does a QLoRA base, which bitsandbytes
quantises as it loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automodel.config import TargetPolicy, build, parse_section
from automodel.errors import UserError
from automodel.models import attention, families
from automodel.models.dora import fill_dora_magnitudes
from automodel.models.loader import MODEL_KEY, model_error, parse_dtype, resolve_model_folder
from automodel.models.materialize import (
    check_materialized,
    fill_from_full,
    init_non_persistent_buffers,
    load_checkpoint_weights,
    lora_initial_values,
    loaded_names,
)
from automodel.models.unwrap import transformers_model
from automodel.models.weights import check_bin_files, check_matches_model, find_safetensors
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


def build_model(cfg: dict[str, Any], parallel=None, device: torch.device | None = None,
                policy: TargetPolicy = TargetPolicy()) -> nn.Module:
    """The model of `cfg` (LoRA applied when `peft` is set), spread over `parallel`'s processes when given.
    A `model._target_` other than automodel's loader must come from a package `policy` trusts."""
    device = parallel.device if parallel is not None else (device or torch.device("cpu"))
    node, lora = model_section(cfg), lora_settings(cfg)
    if lora is not None and lora.quantization is not None:
        return build_quantized(node, lora, parallel, device, policy)
    if node["_target_"] == LOAD_CAUSAL_LM and not node.get("gguf_file"):
        options = {k: v for k, v in node.items() if k != "_target_"}
        folder = resolve_model_folder(options.get("pretrained_model_name_or_path"), options.get("revision"))
        checkpoint = find_safetensors(folder)
        if checkpoint is not None:
            model = build_on_meta(options, checkpoint, lora, parallel, device)
            if model is not None:
                return model
        elif check_bin_files(folder):
            logger.info("model: %s holds .bin weights: each process loads the whole model", folder)
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
    """QLoRA: transformers loads the base in 4 bits (bitsandbytes), straight onto this process's device."""
    lora.quantization.check_device(device, parallel.world_size if parallel is not None else 1)
    model = build(node, "model", policy=policy, quantization_config=lora.quantization.bnb_config(),
                  device_map={"": device})
    if not isinstance(model, nn.Module):
        raise UserError(f"model._target_ returned {type(model).__name__}, expected a torch.nn.Module")
    model = lora.apply(model)
    return parallel.parallelize(model) if parallel is not None else model


def meta_model(options: dict[str, Any], folder: Path) -> nn.Module | None:
    """The model of the folder's config (with the section's overrides), its parameters on the meta device; None
    for a remote-code family whose weights transformers converts on load (automodel/models/families)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = {k: v for k, v in options.items() if k not in LOADER_OPTIONS}
    trust = bool(options.get("trust_remote_code", False))
    attn = options.get("attn_implementation")
    if attn == attention.AUTOMODEL_SDPA:
        attention.register()
    try:
        family = families.meta_config(folder, trust, overrides)
        if family is None:
            return None
        config, published = family
        if config is None:
            config, unused = AutoConfig.from_pretrained(folder, trust_remote_code=trust, return_unused_kwargs=True,
                                                        **overrides)
            if unused:  # transformers would drop them; the whole-model load refuses them too
                raise UserError(f"model.{next(iter(unused))}: {type(config).__name__} has no such setting; remove "
                                "the key or name one of the model config's fields")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(options.get("dtype", "float32")),
                                                     attn_implementation=attn, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise model_error(str(folder), err) from err
    if published is not None:
        families.mark_published(model, published)
    if attn is None:
        attention.use_automodel_sdpa(model)
    return model


def build_on_meta(options: dict[str, Any], checkpoint, lora: LoraSettings | None, parallel,
                  device: torch.device) -> nn.Module | None:
    """Steps 1-5 of the module docstring; None when the checkpoint's names need transformers' conversion."""
    model = meta_model(options, checkpoint.folder)
    if model is None:
        logger.info("model: %s's weights are converted on load: each process loads the whole model",
                    checkpoint.folder)
        return None
    wanted = loaded_names(model)
    if set(wanted) - set(checkpoint.tensors) and set(checkpoint.tensors) - set(wanted):
        logger.info("model: the checkpoint's tensor names differ from %s's (transformers converts them on load): "
                    "each process loads the whole model", type(model).__name__)
        return None
    check_matches_model(checkpoint, wanted)
    logger.info("model: built on the meta device; each process reads its shard of %s (%d files)",
                checkpoint.folder, len(checkpoint.files))
    lora_values = {}
    if lora is not None:
        rng_before = torch.get_rng_state()
        model = lora.apply(model)
        lora_values = lora_initial_values(model, rng_before)
    if parallel is not None:
        model = parallel.shard(model)
    model.to_empty(device=device)
    hf = transformers_model(model)
    hf.tie_weights()
    load_checkpoint_weights(model, checkpoint.folder, set(wanted), peft=lora is not None)
    fill_from_full(model, lora_values)
    if lora is not None and lora.use_dora:
        fill_dora_magnitudes(model, lora_values)
    init_non_persistent_buffers(hf)
    check_materialized(model)
    return parallel.replicate(model) if parallel is not None else model

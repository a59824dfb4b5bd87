"""Phi-3-Small's published config.json translated into the LlamaConfig that Phi3SmallLlamaForCausalLM
(automodel/models/families/phi3small.py) reads. Kept apart from the module so that reading the family table
imports no torch."""

from __future__ import annotations

import math
from typing import Any

from automodel.errors import UserError
from automodel.models.families.fields import PublishedFields

# Published fields that only pick kernels or input padding for them: the math is the same without them.
KERNEL_ONLY = ("blocksparse_triton_kernel_block_size", "pad_sequence_to_multiple_of_64", "gegelu_pad_to_256")


# The keys of Phi-3-small-128k's `rope_scaling` (LongRoPE): the published code names the type "su" (later "longrope").
LONGROPE_TYPES = ("su", "longrope")
LONGROPE_KEYS = frozenset({"type", "short_factor", "long_factor", "short_mscale", "long_mscale",
                           "original_max_position_embeddings"})


def phi3small(fields: PublishedFields) -> tuple[str, dict[str, Any]]:
    """Phi-3-Small: see phi3small.py for the math. A rotary position scale other than 1 is not implemented."""
    fields.expect("hidden_act", ("gegelu",), "gegelu")
    fields.expect("rope_position_scale", (1.0, 1), 1.0)
    fields.expect("ff_dim_multiplier", (None,))
    fields.expect("reorder_and_upcast_attn", (False,), False)
    fields.expect("tie_word_embeddings", (True,), True)  # the published code copies the embeddings into lm_head
    for name in KERNEL_ONLY:
        fields.take(name)
    native = {name: fields.take(name, required=True) for name in
              ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "max_position_embeddings")}
    head_dim = native["hidden_size"] // native["num_attention_heads"]
    rotary = rotary_fields(fields, head_dim, native["max_position_embeddings"])
    multiplier = float(fields.take("mup_attn_multiplier", 1.0))
    scale = multiplier / head_dim if fields.take("mup_use_scaling", True) else 1 / math.sqrt(head_dim)
    return "llama", {
        **native, "intermediate_size": fields.take("ff_intermediate_size", required=True),
        "tie_word_embeddings": True, "hidden_act": "gegelu", "attention_bias": True,
        **rotary,
        "layer_norm_epsilon": float(fields.take("layer_norm_epsilon", 1e-5)),
        "gegelu_limit": fields.take("gegelu_limit", 20.0),
        "attention_scale": scale,
        "attention_dropout": float(fields.take("attention_dropout_prob", 0.0)),
        "embedding_dropout_prob": float(fields.take("embedding_dropout_prob", 0.1)),
        "ffn_dropout_prob": float(fields.take("ffn_dropout_prob", 0.1)),
        "mup_embedding_multiplier": float(fields.take("mup_embedding_multiplier", 10.0) or 1.0),
        "mup_width_multiplier": float(fields.take("mup_width_multiplier", 8.0) or 1.0),
        "dense_attention_every_n_layers": fields.take("dense_attention_every_n_layers", 2),
        "blocksparse_block_size": fields.take("blocksparse_block_size", 64),
        "blocksparse_num_local_blocks": fields.take("blocksparse_num_local_blocks", 16),
        "blocksparse_vert_stride": fields.take("blocksparse_vert_stride", 8),
        "blocksparse_homo_head_pattern": bool(fields.take("blocksparse_homo_head_pattern", False)),
    }


def rotary_fields(fields: PublishedFields, head_dim: int, max_positions: int) -> dict[str, Any]:
    """`rope_parameters` (and `longrope_mscales`) of the native config. The 8k checkpoints: plain rotary of base
    `rope_embedding_base`. The 128k ones: LongRoPE, `rope_scaling` = {"type": "su", "short_factor", "long_factor"
    (one divisor per rotary frequency, head_dim / 2 each), "original_max_position_embeddings", and optionally
    "short_mscale" / "long_mscale"}, which is transformers' "longrope" with the same base: the short factors while
    the sequence fits in original_max_position_embeddings, the long ones beyond, cos/sin scaled by
    sqrt(1 + ln(max / original) / ln(original)) unless the config gives each regime its own scale (then
    `longrope_mscales`, which Phi3SmallRotaryEmbedding applies)."""
    base = float(fields.take("rope_embedding_base", 1e6))
    scaling = fields.take("rope_scaling")
    top_original = fields.take("original_max_position_embeddings")  # no effect without rope_scaling
    if scaling is None:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": base}}
    kind = scaling.get("type") if isinstance(scaling, dict) else scaling
    if kind not in LONGROPE_TYPES:
        raise UserError(f"{fields.where('rope_scaling')} of type {kind!r} is not supported (expected null or "
                        f"LongRoPE: type {' or '.join(map(repr, LONGROPE_TYPES))} with short_factor and long_factor)")
    unknown = sorted(set(scaling) - LONGROPE_KEYS)
    if unknown:
        raise UserError(f"{fields.where('rope_scaling')} key {unknown[0]!r} is not supported (LongRoPE reads "
                        f"{', '.join(sorted(LONGROPE_KEYS))})")
    factors = {name: longrope_factors(fields, scaling, name, head_dim // 2) for name in ("short_factor", "long_factor")}
    original = longrope_original(fields, scaling.get("original_max_position_embeddings"), top_original)
    rope = {"rope_type": "longrope", "rope_theta": base, **factors, "original_max_position_embeddings": original,
            "factor": max_positions / original}  # the ratio transformers' attention factor is computed from
    native: dict[str, Any] = {"rope_parameters": rope}
    mscales = [scaling.get(name) for name in ("short_mscale", "long_mscale")]
    if any(value is not None for value in mscales):
        default = longrope_mscale(max_positions, original)
        native["longrope_mscales"] = [float(default if value is None else value) for value in mscales]
    return native


def longrope_factors(fields: PublishedFields, scaling: dict, name: str, count: int) -> list[float]:
    values = scaling.get(name)
    if not (isinstance(values, list) and len(values) == count
            and all(isinstance(v, (int, float)) and v > 0 for v in values)):
        raise UserError(f"{fields.where('rope_scaling')} {name} must be a list of {count} positive numbers (one per "
                        f"rotary frequency: head_dim / 2), got {values!r}")
    return [float(v) for v in values]


def longrope_original(fields: PublishedFields, inside: Any, top: Any) -> int:
    """original_max_position_embeddings, from rope_scaling or the top level (both: they must agree)."""
    if inside is not None and top is not None and inside != top:
        raise UserError(f"{fields.where('rope_scaling')} original_max_position_embeddings = {inside!r} differs from "
                        f"the top-level original_max_position_embeddings = {top!r}")
    original = inside if inside is not None else top
    if not isinstance(original, int) or original < 2:
        raise UserError(f"{fields.where('original_max_position_embeddings')} = {original!r}: LongRoPE needs the "
                        f"pretraining length (an integer > 1) in rope_scaling or at the top level")
    return original


def longrope_mscale(max_positions: int, original: int) -> float:
    """The cos/sin scale of LongRoPE when the config gives none (transformers' longrope attention factor)."""
    scale = max_positions / original
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))

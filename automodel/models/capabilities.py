"""What a built model can take at run time: padding-free and packed batches, the last layer on label rows.

The recipe asks these questions once the model is built (its attention implementation and `model_type` known);
the answers travel to the collator as `automodel.batch.BatchLayouts` and to the forward plan
(automodel/models/forward_plan.py). The sets below are measured, not assumed: tests/models/test_padding_free.py
checks every native row of the supported-models table (automodel/models/registry.py) against them, and
tests/models/test_registry.py that they name only the table's model types.
"""

from __future__ import annotations

from automodel.batch import BatchLayouts
from automodel.models.attention import AUTOMODEL_SDPA

# model_type values whose padding-free batches (examples back to back in one row, automodel/batch.py
# `FlatCollator`) give each example the logits it gets alone: tests/models/test_padding_free.py checks every native
# row and this list (baichuan_alibi, Baichuan-13B, which no row's own checkpoint is:
# tests/models/test_family_baichuan13b.py).
PADDING_FREE_VERIFIED: frozenset[str] = frozenset({
    "baichuan_alibi",
    "cohere", "cohere2", "deepseek_v2", "deepseek_v3", "exaone", "exaone4", "gemma", "gemma3_text", "glm", "glm4",
    "gpt_bigcode", "gpt_neox", "gptj", "granite", "granitemoe", "granitemoeshared", "internlm3", "jais", "llama",
    "minicpm3", "mistral", "mixtral", "olmo", "olmo2", "olmoe", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "starcoder2",
})

# Of those, the model_types whose packed rows transformers' own attention (the CUDA default) keeps apart from the
# restarting position ids alone; checked by the same test. The ALiBi attentions (Jais, Baichuan-13B) build their
# bias from the mask automodel's collator passes, which the position-ids-only rows do not carry.
ALIBI_TYPES = frozenset({"jais", "baichuan_alibi"})
POSITION_IDS_PACKING_VERIFIED: frozenset[str] = PADDING_FREE_VERIFIED - ALIBI_TYPES

# The mixture-of-experts model types of the table (kind "moe"; tests/models/test_registry.py keeps the two equal).
MOE_TYPES = frozenset({"deepseek_v2", "deepseek_v3", "granitemoe", "granitemoeshared", "mixtral", "olmoe",
                       "qwen2_moe", "qwen3_moe"})

# Where the last layer may compute only the rows the loss reads (automodel/models/label_rows.py): the
# padding-free rows except mixture-of-experts ones, whose router would still route the skipped rows (and count them
# in its load-balancing loss). tests/models/test_padding_free.py checks each in float64.
# Jais's ALiBi attention calls SDPA itself (automodel/models/families/jais.py), not automodel_sdpa, which limits rows;
# Baichuan-13B's passes automodel_sdpa a float mask (the ALiBi bias), with which it computes every row.
LAST_LAYER_ROWS_VERIFIED: frozenset[str] = PADDING_FREE_VERIFIED - MOE_TYPES - ALIBI_TYPES

# Attention implementations that take a 4D boolean mask as given.
PACKING_ATTENTION = ("sdpa", AUTOMODEL_SDPA)
# transformers' own attention that keeps the examples of a flattened row apart when told only by restarting
# position ids (and no attention mask): flash-attention as varlen, SDPA through a block-diagonal mask. Used on CUDA,
# where `automodel_sdpa` is not the default (automodel/models/attention.py `automodel_sdpa_by_default`).
POSITION_IDS_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def batch_layouts(attn_implementation: str | None, model_type: str | None, device_type: str = "cpu") -> BatchLayouts:
    """The batch layouts a model of this attention and type takes. Padding-free: on CUDA, transformers' own
    attention (`POSITION_IDS_ATTENTION`) reads the examples from the position ids; on CPU only `automodel_sdpa`
    does it (the measured path)."""
    own_attention = device_type == "cuda" and attn_implementation in POSITION_IDS_ATTENTION
    padding_free_problem = None
    if attn_implementation != AUTOMODEL_SDPA and not own_attention:
        padding_free_problem = (f"needs model.attn_implementation {AUTOMODEL_SDPA} (the default where transformers "
                                f"picks sdpa), got {attn_implementation!r}")
    elif model_type not in PADDING_FREE_VERIFIED:
        padding_free_problem = (f"is not verified for model_type {model_type!r} (tests/models/test_padding_free.py "
                                "checks that examples in one row do not see each other); set it to false")
    elif own_attention and model_type not in POSITION_IDS_PACKING_VERIFIED:
        padding_free_problem = (f"with transformers' own attention is not verified for model_type {model_type!r} "
                                "(its rows carry only restarting position ids); set it to false")
    packing_problem = None
    if attn_implementation is not None and attn_implementation not in PACKING_ATTENTION:
        packing_problem = (f"needs model.attn_implementation {' or '.join(PACKING_ATTENTION)} (it passes a "
                           f"block-diagonal mask), got {attn_implementation!r}")
    return BatchLayouts(padding_free_problem, position_ids_only=attn_implementation != AUTOMODEL_SDPA,
                        packing_problem=packing_problem)


def model_batch_layouts(model_config, device_type: str) -> BatchLayouts:
    """`batch_layouts` of a built model's (transformers) config on `device_type`."""
    return batch_layouts(getattr(model_config, "_attn_implementation", None), model_config.model_type, device_type)


def last_layer_rows_supported(config) -> bool:
    """Whether the model's last layer may compute only the rows the loss reads (`LAST_LAYER_ROWS`)."""
    return config._attn_implementation == AUTOMODEL_SDPA and config.model_type in LAST_LAYER_ROWS_VERIFIED

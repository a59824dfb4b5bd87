"""Phi-3-Small's published config.json translated into the LlamaConfig that Phi3SmallLlamaForCausalLM
(automodel/models/families/phi3small.py) reads. Kept apart from the module so that reading the family table
imports no torch."""

from __future__ import annotations

import math
from typing import Any

from automodel.models.families.fields import PublishedFields

# Published fields that only pick kernels or input padding for them: the math is the same without them.
KERNEL_ONLY = ("blocksparse_triton_kernel_block_size", "pad_sequence_to_multiple_of_64", "gegelu_pad_to_256")


def phi3small(fields: PublishedFields) -> tuple[str, dict[str, Any]]:
    """Phi-3-Small: see phi3small.py for the math. The 128k checkpoints' LongRoPE (`rope_scaling`, its "su"
    short/long factors and their own mscales) and a rotary position scale other than 1 are not implemented."""
    fields.expect("hidden_act", ("gegelu",), "gegelu")
    fields.expect("rope_scaling", (None,))
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
    multiplier = float(fields.take("mup_attn_multiplier", 1.0))
    scale = multiplier / head_dim if fields.take("mup_use_scaling", True) else 1 / math.sqrt(head_dim)
    return "llama", {
        **native, "intermediate_size": fields.take("ff_intermediate_size", required=True),
        "tie_word_embeddings": True, "hidden_act": "gegelu", "attention_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(fields.take("rope_embedding_base", 1e6))},
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

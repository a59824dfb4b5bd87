"""Published configs of remote-code families, translated into the config of the transformers class whose math
is the same. Each translator reads the fields the family's own modeling code reads (described in
docs/supported_models.md) and returns (native model_type, native config fields).
"""

from __future__ import annotations

import math
from typing import Any

from automodel.errors import UserError
from automodel.models.families.fields import PublishedFields

SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "max_position_embeddings")


def _llama_core(fields: PublishedFields, norm_eps: str = "rms_norm_eps") -> dict[str, Any]:
    """The fields every Llama-derived family shares, under the same names."""
    native = {name: fields.take(name, required=True) for name in SIZES}
    native["num_key_value_heads"] = fields.take("num_key_value_heads", native["num_attention_heads"])
    native[norm_eps] = fields.take(norm_eps, 1e-6)
    native["tie_word_embeddings"] = fields.take("tie_word_embeddings", False)
    fields.expect("hidden_act", ("silu",), "silu")
    for dropout in ("attention_dropout", "hidden_dropout"):
        if fields.take(dropout):
            native[dropout] = fields.config[dropout]
    return native


def _plain_rope(fields: PublishedFields) -> dict[str, Any]:
    fields.expect("rope_scaling", (None,))
    return {"rope_type": "default", "rope_theta": float(fields.take("rope_theta", 10000.0))}


def aquila(fields: PublishedFields) -> tuple[str, dict]:
    """Aquila/Aquila2: the Llama decoder under another name."""
    native = _llama_core(fields)
    return "llama", {**native, "rope_parameters": _plain_rope(fields), "attention_bias": False}


def deepseek(fields: PublishedFields) -> tuple[str, dict]:
    """DeepSeek LLM v1 (DeepseekForCausalLM): the dense configs are the Llama decoder. The MoE configs
    (deepseek-moe, `n_routed_experts` set) replace the MLP of every `moe_layer_freq`-th layer from
    `first_k_dense_replace` on with routed plus shared experts (automodel/models/families/deepseek_moe.py)."""
    fields.expect("attention_bias", (False,), False)
    native = _llama_core(fields)
    if fields.take("n_routed_experts") is not None:
        native.update(_deepseek_moe(fields))
    return "llama", {**native, "rope_parameters": _plain_rope(fields), "attention_bias": False}


def deepseek_class(published: dict[str, Any]) -> str | None:
    """Dense DeepSeek configs are Llama's (config only); MoE ones load into the native MoE module."""
    return "DeepseekMoeLlamaForCausalLM" if published.get("n_routed_experts") is not None else None


def _deepseek_moe(fields: PublishedFields) -> dict[str, Any]:
    """deepseek-moe's routing: softmax over `n_routed_experts` router logits, the top `num_experts_per_tok` experts
    weighted by their probabilities (renormalised to sum 1 when `norm_topk_prob`), plus `n_shared_experts` always-on
    experts fused as one MLP of n_shared_experts x moe_intermediate_size. `aux_loss_alpha` / `seq_aux` only shape
    the published code's training loss; they are read and recorded, not applied (docs/supported_models.md)."""
    fields.expect("scoring_func", ("softmax",), "softmax")
    shared = fields.take("n_shared_experts")
    if not isinstance(shared, int) or shared < 1:
        fields.expect("n_shared_experts", ())  # one line naming the field: no shared experts is not implemented
    moe = {"n_routed_experts": fields.config["n_routed_experts"], "num_experts": fields.config["n_routed_experts"],
           "n_shared_experts": shared, "norm_topk_prob": bool(fields.take("norm_topk_prob", False)),
           "first_k_dense_replace": int(fields.take("first_k_dense_replace", 0)),
           "moe_layer_freq": int(fields.take("moe_layer_freq", 1)),
           "aux_loss_alpha": float(fields.take("aux_loss_alpha", 0.001)), "seq_aux": fields.take("seq_aux", True),
           # DeepSeek-V2's router and experts (transformers), as deepseek-moe uses them: plain top-k, no scaling.
           "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": None, "topk_group": None,
           "mlp_bias": False}
    for name in ("moe_intermediate_size", "num_experts_per_tok"):
        moe[name] = fields.take(name, required=True)
    return moe


def internlm(fields: PublishedFields) -> tuple[str, dict]:
    """InternLM (v1): Llama with a bias on q, k, v and o (`bias`), rotary described by `rotary`
    ({"base", "type": "origin" | "dynamic", "scaling_factor"}); "dynamic" is NTK scaling past
    max_position_embeddings, which is transformers' "dynamic" rope."""
    native = _llama_core(fields)
    rotary = dict(fields.take("rotary", {"base": 10000, "type": "dynamic"}))
    kind = rotary.pop("type", "origin")
    if kind not in ("origin", "dynamic"):
        fields.expect("rotary", ())  # one line naming the field
    rope = {"rope_type": "default" if kind == "origin" else "dynamic", "rope_theta": float(rotary.pop("base", 10000))}
    if kind == "dynamic":
        rope["factor"] = float(rotary.pop("scaling_factor", 1.0))
    if rotary:
        fields.expect("rotary", ())
    return "llama", {**native, "rope_parameters": rope, "attention_bias": fields.take("bias", True)}


def orion(fields: PublishedFields) -> tuple[str, dict]:
    """Orion: the Llama decoder with LayerNorm (weight and bias, eps from `rms_norm_eps`) in place of RMSNorm.
    transformers' StableLm decoder is exactly that with full rotary, sequential residuals, no q/k norm."""
    native = _llama_core(fields)
    native["layer_norm_eps"] = native.pop("rms_norm_eps")
    fields.expect("attention_bias", (False,), False)
    rope = {**_plain_rope(fields), "partial_rotary_factor": 1.0}
    return "stablelm", {**native, "rope_parameters": rope, "use_qkv_bias": False, "qk_layernorm": False,
                        "use_parallel_residual": False}


def minicpm(fields: PublishedFields) -> tuple[str, dict]:
    """MiniCPM (v1/v2 dense): Llama with muP scalings: embeddings x `scale_emb`, each residual branch x
    `scale_depth / sqrt(num_hidden_layers)`, the final hidden state / (hidden_size / `dim_model_base`) before
    lm_head. Granite's embedding/residual/logits multipliers are the same operations (lm_head has no bias, so
    dividing its input or its output is equal); attention keeps 1/sqrt(head_dim)."""
    fields.expect("num_experts", (None,))
    native = _llama_core(fields)
    fields.expect("attention_bias", (False,), False)
    head_dim = native["hidden_size"] // native["num_attention_heads"]
    return "granite", {
        **native, "rope_parameters": _plain_rope(fields), "attention_bias": False, "mlp_bias": False,
        "embedding_multiplier": float(fields.take("scale_emb", 1.0)),
        "residual_multiplier": float(fields.take("scale_depth", 1.0)) / math.sqrt(native["num_hidden_layers"]),
        "logits_scaling": native["hidden_size"] / fields.take("dim_model_base", required=True),
        "attention_multiplier": head_dim ** -0.5,
    }


# Baichuan's vocabularies (Baichuan 2 technical report: 64,000 tokens in Baichuan 1, 125,696 in Baichuan 2), which
# is what tells a Baichuan-13B config from a Baichuan2-13B one (same architectures entry, same fields).
BAICHUAN_13B_VOCAB, BAICHUAN2_VOCAB = 64000, 125696


def baichuan(fields: PublishedFields) -> tuple[str, dict]:
    """Baichuan (automodel/models/families/baichuan.py): the Llama decoder whose fused `W_pack` is split by the
    weight conversion of automodel/models/families/conversions.py. Baichuan-7B (`BaiChuanForCausalLM`) and
    Baichuan2-7B (`BaichuanForCausalLM`) use rotary positions (base 10000) up to `max_position_embeddings`;
    Baichuan-13B and Baichuan2-13B (`BaichuanForCausalLM` configs without `max_position_embeddings`, naming only
    `model_max_length`) use ALiBi. Baichuan2 normalises its lm_head rows: the 7B by its architectures entry, the
    13B by its vocabulary size (BAICHUAN2_VOCAB; BAICHUAN_13B_VOCAB for Baichuan-13B, any other size stops)."""
    architectures = fields.expect("architectures", (["BaiChuanForCausalLM"], ["BaichuanForCausalLM"]))
    baichuan2 = architectures == ["BaichuanForCausalLM"]
    alibi = baichuan2 and "max_position_embeddings" not in fields.config
    # Baichuan2's own training loss adds z_loss_weight x max-logit^2; automodel computes its own loss.
    fields.expect("z_loss_weight", (0, None))
    fields.take("_from_model_config")  # generation-config bookkeeping
    if baichuan2:  # NormHead is its own matrix, never the embedding (Baichuan-13B's lm_head is untied too)
        fields.expect("tie_word_embeddings", (False,), False)
    if alibi:
        return _baichuan_alibi(fields)
    native = _llama_core(fields)
    if native["num_key_value_heads"] != native["num_attention_heads"]:
        fields.expect("num_key_value_heads", (native["num_attention_heads"],))
    return "llama", {**native, "rope_parameters": _plain_rope(fields), "attention_bias": False,
                     "baichuan_norm_head": baichuan2}


def baichuan_class(published: dict[str, Any]) -> str:
    """The 7B configs load into BaichuanLlamaForCausalLM (rotary), the 13B ones (no `max_position_embeddings`)
    into BaichuanAlibiLlamaForCausalLM."""
    return "BaichuanLlamaForCausalLM" if "max_position_embeddings" in published else "BaichuanAlibiLlamaForCausalLM"


def _baichuan_alibi(fields: PublishedFields) -> tuple[str, dict]:
    """Baichuan-13B / Baichuan2-13B: ALiBi in place of rotary, so a rotary setting stops the load."""
    from automodel.models.families.baichuan import register

    register()
    for name in ("rope_theta", "rope_scaling", "position_embedding_type", "alibi_scaling"):
        fields.expect(name, (None,))
    vocab = fields.take("vocab_size", required=True)
    if vocab not in (BAICHUAN_13B_VOCAB, BAICHUAN2_VOCAB):
        raise UserError(f"{fields.where('vocab_size')} = {vocab!r} is not supported: an ALiBi Baichuan config (no "
                        f"'max_position_embeddings') is Baichuan-13B ({BAICHUAN_13B_VOCAB}, plain lm_head) or "
                        f"Baichuan2-13B ({BAICHUAN2_VOCAB}, normalised lm_head), told apart by this size")
    native = {name: fields.take(name, required=True) for name in SIZES if name not in ("vocab_size",
                                                                                    "max_position_embeddings")}
    fields.expect("num_key_value_heads", (None, native["num_attention_heads"]))
    fields.expect("hidden_act", ("silu",), "silu")
    return "baichuan_alibi", {
        **native, "vocab_size": vocab, "num_key_value_heads": native["num_attention_heads"],
        "rms_norm_eps": fields.take("rms_norm_eps", 1e-6), "tie_word_embeddings": False, "attention_bias": False,
        "max_position_embeddings": fields.take("model_max_length", 4096),  # ALiBi has no limit; recorded only
        "baichuan_norm_head": vocab == BAICHUAN2_VOCAB}


def internlm2(fields: PublishedFields) -> tuple[str, dict]:
    """InternLM2: the Llama decoder (grouped-query attention, no biases: `bias` false) under other weight names
    (converted by automodel/models/families/conversions.py); `rope_scaling` {"type": "dynamic" | "linear",
    "factor"} is transformers' dynamic-NTK / linear rope."""
    fields.expect("bias", (False,), False)
    native = _llama_core(fields)
    rope = {"rope_type": "default", "rope_theta": float(fields.take("rope_theta", 10000.0))}
    scaling = fields.take("rope_scaling")
    if scaling is not None:
        if set(scaling) != {"type", "factor"} or scaling["type"] not in ("dynamic", "linear"):
            fields.expect("rope_scaling", (None,))
        rope.update(rope_type=scaling["type"], factor=float(scaling["factor"]))
    return "llama", {**native, "rope_parameters": rope, "attention_bias": False}


def chatglm(fields: PublishedFields) -> tuple[str, dict]:
    """ChatGLM2/3 (`ChatGLMModel`, model_type chatglm) onto transformers' GLM: RMSNorm, q/k/v bias
    (`add_qkv_bias`), no other linear bias, grouped-query attention (`multi_query_group_num` groups), rotary over
    the first half of each head in interleaved pairs with base 10000 x `rope_ratio`, SwiGLU `dense_h_to_4h`
    ([gate | up]). Fields that only pick kernels or fp32 casts (`apply_query_key_layer_scaling`,
    `attention_softmax_in_fp32`, `bias_dropout_fusion`, `fp32_residual_connection`) do not change the math."""
    for name, allowed, default in (("rmsnorm", (True,), True), ("add_bias_linear", (False,), False),
                                   ("apply_residual_connection_post_layernorm", (False,), False),
                                   ("post_layer_norm", (True,), True), ("original_rope", (True,), True),
                                   ("pre_seq_len", (None,), None), ("prefix_projection", (False,), False),
                                   ("hidden_dropout", (0.0, 0), 0.0)):
        fields.expect(name, allowed, default)
    for name in ("apply_query_key_layer_scaling", "attention_softmax_in_fp32", "bias_dropout_fusion",
                 "fp32_residual_connection", "classifier_dropout"):
        fields.take(name)
    heads = fields.take("num_attention_heads", required=True)
    groups = fields.take("multi_query_group_num", 1) if fields.take("multi_query_attention", False) else heads
    return "glm", {
        "vocab_size": fields.take("padded_vocab_size", required=True),
        "hidden_size": fields.take("hidden_size", required=True),
        "intermediate_size": fields.take("ffn_hidden_size", required=True),
        "num_hidden_layers": fields.take("num_layers", required=True),
        "num_attention_heads": heads, "num_key_value_heads": groups,
        "head_dim": fields.take("kv_channels", required=True),
        "max_position_embeddings": fields.take("seq_length", 2048),
        "rms_norm_eps": fields.take("layernorm_epsilon", 1e-5),
        "attention_dropout": fields.take("attention_dropout", 0.0) or 0.0,
        "attention_bias": fields.take("add_qkv_bias", False),
        "tie_word_embeddings": fields.take("tie_word_embeddings", False),
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5,
                            "rope_theta": 10000.0 * float(fields.take("rope_ratio", 1))},
    }


# The keys of a DeciLM block config's parts, and the values under which a layer is a plain Llama layer part.
DECI_ATTENTION = {"no_op": (False, True), "n_heads_in_group": None, "replace_with_linear": (False,),
                  "sparsify": (None,), "num_sink_tokens": (None,), "use_prefill_window_in_sink_attention": (False,),
                  "unshifted_sink": (False,), "window_length": (None,)}
DECI_FFN = {"no_op": (False, True), "ffn_mult": None, "replace_with_linear": (False,), "sparsify": (None,)}


def _deci_block(fields: PublishedFields, index: int, block: dict) -> dict:
    """One entry of `block_configs`, checked: linear replacements, sparsity and sink/window attention are not
    implemented and stop the load naming the entry."""
    for part, known in (("attention", DECI_ATTENTION), ("ffn", DECI_FFN)):
        for key, value in block.get(part, {}).items():
            allowed = known.get(key, ())
            if key not in known or (allowed is not None and value not in allowed):
                fields.expect(f"block_configs[{index}].{part}.{key}", (), value)
    return block


def decilm(fields: PublishedFields) -> tuple[str, dict]:
    """DeciLM / Nemotron-NAS: Llama with per-layer `block_configs` (automodel/models/families/decilm.py);
    `rope_scaling` may be Llama 3's."""
    fields.expect("attention_bias", (False,), False)
    fields.expect("mlp_bias", (False,), False)
    fields.take("intermediate_size")  # null in the published configs: each layer's width comes from ffn_mult
    fields.take("num_key_value_heads")  # likewise from n_heads_in_group
    native = {name: fields.take(name, required=True) for name in SIZES if name != "intermediate_size"}
    native["rms_norm_eps"] = fields.take("rms_norm_eps", 1e-5)
    native["tie_word_embeddings"] = fields.take("tie_word_embeddings", False)
    fields.expect("hidden_act", ("silu",), "silu")
    fields.expect("attention_dropout", (0.0, 0, None), 0.0)
    blocks = fields.take("block_configs", required=True)
    if len(blocks) != native["num_hidden_layers"]:
        fields.expect("block_configs", ())
    blocks = [_deci_block(fields, i, block) for i, block in enumerate(blocks)]
    rope = {"rope_type": "default", "rope_theta": float(fields.take("rope_theta", 10000.0))}
    scaling = fields.take("rope_scaling")
    if scaling is not None:
        if scaling.get("rope_type") != "llama3":
            fields.expect("rope_scaling", (None,))
        rope.update(scaling)
    return "llama", {**native, "rope_parameters": rope, "attention_bias": False, "mlp_bias": False,
                     "block_configs": blocks, "intermediate_size": 0,
                     "num_key_value_heads": native["num_attention_heads"]}


def solar(fields: PublishedFields) -> tuple[str, dict]:
    """Solar Pro: the Mistral decoder (Llama's layers, `sliding_window`) plus the skip-connection blends of
    automodel/models/families/solar.py (`bskcn_1`..`bskcn_4` layer lists, `bskcn_tv` [training, inference]
    weights). A blend list entry needs a state kept at or before that layer, as the published code reads it."""
    native = _llama_core(fields)
    fields.expect("attention_bias", (False,), False)
    fields.expect("mlp_bias", (False,), False)
    layers = native["num_hidden_layers"]
    skips = {}
    for name in ("bskcn_1", "bskcn_2", "bskcn_3", "bskcn_4"):
        value = fields.take(name, required=True)
        if not isinstance(value, list) or not all(isinstance(i, int) and 0 <= i < layers for i in value):
            fields.expect(name, (), value)
        skips[name] = value
    for kept, blended in (("bskcn_1", "bskcn_3"), ("bskcn_2", "bskcn_4")):
        if skips[blended] and (not skips[kept] or min(skips[blended]) < min(skips[kept])):
            fields.expect(blended, (), skips[blended])  # it would blend a state nothing kept yet
    weights = fields.take("bskcn_tv", required=True)
    if not isinstance(weights, list) or len(weights) != 2 or not all(isinstance(w, (int, float)) for w in weights):
        fields.expect("bskcn_tv", (), weights)
    head_dim = native["hidden_size"] // native["num_attention_heads"]
    return "mistral", {**native, **skips, "bskcn_tv": [float(w) for w in weights], "head_dim": head_dim,
                       "rope_parameters": _plain_rope(fields), "sliding_window": fields.take("sliding_window")}


# GPT-2 config fields for its sequence-classification head (summary_*) and task presets: no effect on the LM.
GPT2_HEAD_FIELDS = ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                    "summary_first_dropout", "task_specific_params", "n_ctx")


def _jais_mup(fields: PublishedFields, name: str, mup_name: str, default: Any) -> Any:
    """jais-13b names a muP setting `name`, the jais-30b configs `mup_<name>`; either, not both."""
    value, mup_value = fields.take(name), fields.take(mup_name)
    if value is not None and mup_value is not None:
        fields.expect(mup_name, (None,))
    return default if value is None and mup_value is None else (value if value is not None else mup_value)


def jais(fields: PublishedFields) -> tuple[str, dict]:
    """Jais (automodel/models/families/jais.py): GPT-2's layout, SwiGLU, ALiBi and muP scalings. Embeddings x
    `embeddings_scale`; logits x `width_scale` (or `mup_output_alpha` x `mup_width_scale`); scores / head_dim with
    `scale_qk_dot_by_d`, / sqrt(head_dim) without. Learned or rotary positions and `alibi_scaling` (longer
    contexts than trained) are not implemented and stop the load."""
    from automodel.models.families.jais import register

    register()
    fields.expect("position_embedding_type", ("alibi",), "learned")
    fields.expect("alibi_scaling", (None,))
    fields.expect("activation_function", ("swiglu",), "gelu_new")
    fields.expect("scale_attn_weights", (True,), True)
    for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        fields.expect(name, (False,), False)
    for name in GPT2_HEAD_FIELDS:
        fields.take(name)
    output_scale = fields.take("width_scale")
    alpha, width = fields.take("mup_output_alpha"), fields.take("mup_width_scale")
    if output_scale is not None and (alpha is not None or width is not None):
        fields.expect("mup_width_scale", (None,))
    if output_scale is None:
        output_scale = (1.0 if alpha is None else alpha) * (1.0 if width is None else width)
    qk_by_d = _jais_mup(fields, "scale_qk_dot_by_d", "mup_scale_qk_dot_by_d", False)
    return "jais", {
        "vocab_size": fields.take("vocab_size", required=True), "n_embd": fields.take("n_embd", required=True),
        "n_layer": fields.take("n_layer", required=True), "n_head": fields.take("n_head", required=True),
        "n_inner": fields.take("n_inner"), "n_positions": fields.take("n_positions", 1024),
        "layer_norm_epsilon": fields.take("layer_norm_epsilon", 1e-5),
        "resid_pdrop": fields.take("resid_pdrop", 0.1), "embd_pdrop": fields.take("embd_pdrop", 0.1),
        "attn_pdrop": fields.take("attn_pdrop", 0.1), "tie_word_embeddings": fields.take("tie_word_embeddings", True),
        "activation_function": "silu",  # the SwiGLU gate's; JaisMLP applies it
        "embeddings_scale": float(_jais_mup(fields, "embeddings_scale", "mup_embeddings_scale", 1.0)),
        "output_logits_scale": float(output_scale), "attention_scale_power": 1.0 if qk_by_d else 0.5,
    }

"""Tiny checkpoints of remote-code families, written in their PUBLISHED layout without transformers or automodel.

config.json carries what the family's published checkpoints carry (its `architectures`, `model_type`, `auto_map`
pointing at the Hub's modeling files, its own field names), and model.safetensors its own weight names and shapes,
derived here from those fields the way the family's modeling code sizes its modules (model cards and public
inference engines describe them; see docs/supported_models.md). Weights are random, norms near one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from automodel.models.registry import Architecture
from tests.models.tiny import shared_tokenizer
from tests.models.tiny_configs import Variant, tiny_fields, tiny_overrides, variant

AUTO_MAP = {
    "aquila": ("configuration_aquila.AquilaConfig", "modeling_aquila.AquilaForCausalLM"),
    "chatglm": ("configuration_chatglm.ChatGLMConfig", "modeling_chatglm.ChatGLMForConditionalGeneration"),
    "baichuan": ("configuration_baichuan.BaiChuanConfig", "modeling_baichuan.BaiChuanForCausalLM"),
    "deepseek": ("configuration_deepseek.DeepseekConfig", "modeling_deepseek.DeepseekForCausalLM"),
    "nemotron-nas": ("configuration_decilm.DeciLMConfig", "modeling_decilm.DeciLMForCausalLM"),
    "internlm": ("configuration_internlm.InternLMConfig", "modeling_internlm.InternLMForCausalLM"),
    "internlm2": ("configuration_internlm2.InternLM2Config", "modeling_internlm2.InternLM2ForCausalLM"),
    "minicpm": ("configuration_minicpm.MiniCPMConfig", "modeling_minicpm.MiniCPMForCausalLM"),
    "orion": ("configuration_orion.OrionConfig", "modeling_orion.OrionForCausalLM"),
    "phi3small": ("configuration_phi3_small.Phi3SmallConfig", "modeling_phi3_small.Phi3SmallForCausalLM"),
    "solar": ("configuration_solar.SolarConfig", "modeling_solar.SolarForCausalLM"),
    "jais": ("configuration_jais.JAISConfig", "modeling_jais.JAISLMHeadModel"),
}
# Published variants of family rows beyond each row's own tiny checkpoint: (row, config fields over its tiny ones).
# Used by tests/models/test_family_baichuan2_deepseek_moe.py, tests/models/test_family_phi3small_128k.py and
# scripts/check_families_against_vllm.py.
VARIANTS = {
    # Baichuan2-7B's config.json: its own architectures entry and auto_map, model_max_length, z_loss_weight.
    "baichuan2": ("BaiChuanForCausalLM", {
        "architectures": ["BaichuanForCausalLM"], "model_max_length": 256, "z_loss_weight": 0,
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}}),
    # deepseek-moe-16b's fields, tiny: layer 0 dense, layer 1 MoE of 4 routed experts (top 2) and 1 shared one.
    "deepseek-moe": ("DeepseekForCausalLM", {
        "n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 32, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "scoring_func": "softmax", "norm_topk_prob": True,
        "aux_loss_alpha": 0.001, "seq_aux": True, "num_key_value_heads": 4}),  # as many as heads, like 16b
    # Phi-3-small-128k's fields, tiny: LongRoPE ("su") over an original length of 16 positions, so that short
    # sequences exercise both regimes; one distinct factor per rotary frequency (head_dim 16: 8 of them) and each
    # regime's own cos/sin scale, as Phi-3-small-128k's config.json gives them.
    "phi3small-128k": ("Phi3SmallForCausalLM", {
        "max_position_embeddings": 256, "original_max_position_embeddings": 16, "rope_scaling": {
            "type": "su", "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.6, 2.0],
            "long_factor": [1.0, 1.3, 2.1, 3.4, 5.5, 8.9, 14.4, 23.3], "short_mscale": 1.0, "long_mscale": 1.19,
            "original_max_position_embeddings": 16}}),
}


def variant_row(name: str) -> Variant:
    """The row of VARIANTS[name], its tiny config extended by the variant's fields."""
    from automodel.models.registry import BY_NAME

    architecture, fields = VARIANTS[name]
    return variant(BY_NAME[architecture], **fields)


# Families whose norms are LayerNorm with a bias (Orion) and whose q/k/v/o carry a bias (InternLM `bias`).
LAYER_NORM = {"orion"}


def published_config(row: Architecture, tokenizer) -> dict:
    config_class, model_class = AUTO_MAP[row.published_type]
    auto_map = {"AutoConfig": config_class, "AutoModelForCausalLM": model_class}
    if row.published_type == "chatglm":  # its own field names throughout; no bos, no hidden_act
        return {"architectures": [row.test_id], "model_type": "chatglm",
                "auto_map": {**auto_map, "AutoModel": model_class}, **tiny_fields(row), "padded_vocab_size": len(tokenizer),
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                "torch_dtype": "float32", "use_cache": True}
    if row.published_type == "phi3small":  # its own field names, nulls included; no bos of its own
        return {"architectures": [row.test_id], "model_type": "phi3small", "auto_map": auto_map, **tiny_fields(row),
                "vocab_size": len(tokenizer), "bos_token_id": tokenizer.eos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "torch_dtype": "float32", "use_cache": True}
    if row.published_type == "jais":  # GPT-2's field names (n_embd, n_head, ...) and Jais's own
        return {"architectures": [row.test_id], "model_type": "jais",
                "auto_map": {**auto_map, "AutoModel": "modeling_jais.JAISModel"}, **tiny_fields(row),
                "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                "torch_dtype": "float32", "use_cache": True}
    config = {"architectures": [row.test_id], "model_type": row.published_type, "auto_map": auto_map,
              **tiny_overrides(row), "vocab_size": len(tokenizer), "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, "torch_dtype": "float32", "use_cache": True}
    return {name: value for name, value in config.items() if value is not None}  # None: a field it does not have


def llama_layout(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Llama-style names: model.embed_tokens, model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
    input_layernorm, post_attention_layernorm}, model.norm, lm_head (absent when tied)."""
    hidden, inter, vocab = config["hidden_size"], config.get("intermediate_size"), config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim  # DeciLM: per layer below
    biased = config.get("bias", False) if config["model_type"] == "internlm" else False
    layer_norm = config["model_type"] in LAYER_NORM

    def rand(*shape, std=0.05):
        return torch.randn(*shape, generator=generator) * std

    def norm(prefix):
        out = {f"{prefix}.weight": 1 + rand(hidden, std=0.1)}
        if layer_norm:
            out[f"{prefix}.bias"] = rand(hidden, std=0.1)
        return out

    weights = {"model.embed_tokens.weight": rand(vocab, hidden, std=0.5), **norm("model.norm")}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        attention, mlp = True, True
        if "block_configs" in config:  # DeciLM: each layer its own KV heads and MLP width, or none at all
            block = config["block_configs"][i]
            attention, mlp = not block["attention"]["no_op"], not block["ffn"]["no_op"]
            if attention:
                kv = config["num_attention_heads"] // block["attention"]["n_heads_in_group"] * head_dim
            if mlp:  # 2/3 of ffn_mult x hidden, rounded up to a multiple of 256 (DeciLM's model card)
                inter = math.ceil(int(2 * block["ffn"]["ffn_mult"] * hidden / 3) / 256) * 256
        shapes = {}
        if attention:
            shapes.update({"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                           "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden)})
            weights.update(norm(f"{p}.input_layernorm"))
        if mlp:
            shapes.update({"mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                           "mlp.down_proj": (hidden, inter)})
            weights.update(norm(f"{p}.post_attention_layernorm"))
        for name, shape in shapes.items():
            weights[f"{p}.{name}.weight"] = rand(*shape, std=0.1)
            if biased and name.startswith("self_attn"):
                weights[f"{p}.{name}.bias"] = rand(shape[0], std=0.1)
    if not config.get("tie_word_embeddings", False):
        weights["lm_head.weight"] = rand(vocab, hidden, std=0.1)
    if config["model_type"] == "baichuan":  # Baichuan-7B: one W_pack projection, rows q then k then v
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn"
            weights[f"{p}.W_pack.weight"] = torch.cat([weights.pop(f"{p}.{n}_proj.weight") for n in "qkv"])
    if config["model_type"] == "internlm2":
        weights = internlm2_names(weights, config, rand)
    if config.get("n_routed_experts"):
        weights = deepseek_moe_experts(weights, config, rand)
    return weights


def deepseek_moe_experts(weights: dict, config: dict, rand) -> dict[str, torch.Tensor]:
    """DeepSeek-MoE layout: in layer i >= first_k_dense_replace with i % moe_layer_freq == 0, the dense MLP becomes
    mlp.gate (n_routed_experts x hidden), mlp.experts.E.{gate,up,down}_proj (moe_intermediate_size wide) and
    mlp.shared_experts.{gate,up,down}_proj (n_shared_experts x moe_intermediate_size wide)."""
    hidden, width = config["hidden_size"], config["moe_intermediate_size"]
    shared = config["n_shared_experts"] * width
    for i in range(config["num_hidden_layers"]):
        if i < config["first_k_dense_replace"] or i % config["moe_layer_freq"]:
            continue
        p = f"model.layers.{i}.mlp"
        for name in ("gate_proj", "up_proj", "down_proj"):
            del weights[f"{p}.{name}.weight"]
        weights[f"{p}.gate.weight"] = rand(config["n_routed_experts"], hidden, std=0.5)
        experts = [f"{p}.experts.{e}" for e in range(config["n_routed_experts"])] + [f"{p}.shared_experts"]
        for prefix in experts:
            inner = shared if prefix.endswith("shared_experts") else width
            weights.update({f"{prefix}.gate_proj.weight": rand(inner, hidden, std=0.1),
                            f"{prefix}.up_proj.weight": rand(inner, hidden, std=0.1),
                            f"{prefix}.down_proj.weight": rand(hidden, inner, std=0.1)})
    return weights


# InternLM2's own names for the Llama tensors (its modeling code and public inference engines use these).
INTERNLM2_NAMES = {"model.embed_tokens.": "model.tok_embeddings.", "lm_head.": "output.",
                   ".self_attn.o_proj.": ".attention.wo.", ".mlp.gate_proj.": ".feed_forward.w1.",
                   ".mlp.up_proj.": ".feed_forward.w3.", ".mlp.down_proj.": ".feed_forward.w2.",
                   ".input_layernorm.": ".attention_norm.", ".post_attention_layernorm.": ".ffn_norm."}


def internlm2_names(weights: dict, config: dict, rand) -> dict[str, torch.Tensor]:
    """InternLM2 layout: renamed blocks and one `attention.wqkv` per layer of (heads + 2 x kv_heads) x head_dim
    rows (drawn at random here: its row order is what the reference forward of test_families.py reads)."""
    out = {}
    for name, tensor in weights.items():
        if any(f"self_attn.{n}_proj" in name for n in "qkv"):
            continue
        for old, new in INTERNLM2_NAMES.items():
            name = name.replace(old, new)
        out[name] = tensor
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rows = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    for i in range(config["num_hidden_layers"]):
        out[f"model.layers.{i}.attention.wqkv.weight"] = rand(rows, config["hidden_size"], std=0.1)
    return out


def chatglm_layout(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """ChatGLM2/3 names: transformer.embedding.word_embeddings, transformer.rotary_pos_emb.inv_freq (the rotary
    frequencies of the first half of each head), transformer.encoder.layers.N.{input_layernorm,
    self_attention.query_key_value (weight and bias: heads + 2 x groups head blocks), self_attention.dense,
    post_attention_layernorm, mlp.dense_h_to_4h (2 x ffn rows), mlp.dense_4h_to_h}, transformer.encoder.final_layernorm,
    transformer.output_layer."""
    hidden, ffn, d = config["hidden_size"], config["ffn_hidden_size"], config["kv_channels"]
    vocab = config["padded_vocab_size"]
    qkv = (config["num_attention_heads"] + 2 * config["multi_query_group_num"]) * d

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=generator) * std

    rotary = d // 2
    base = 10000 * config["rope_ratio"]
    weights = {"transformer.embedding.word_embeddings.weight": rand(vocab, hidden, std=0.5),
               "transformer.rotary_pos_emb.inv_freq": 1.0 / base ** (torch.arange(0, rotary, 2).float() / rotary),
               "transformer.encoder.final_layernorm.weight": 1 + rand(hidden),
               "transformer.output_layer.weight": rand(vocab, hidden)}
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}"
        weights.update({f"{p}.input_layernorm.weight": 1 + rand(hidden),
                        f"{p}.self_attention.query_key_value.weight": rand(qkv, hidden),
                        f"{p}.self_attention.query_key_value.bias": rand(qkv),
                        f"{p}.self_attention.dense.weight": rand(hidden, config["num_attention_heads"] * d),
                        f"{p}.post_attention_layernorm.weight": 1 + rand(hidden),
                        f"{p}.mlp.dense_h_to_4h.weight": rand(2 * ffn, hidden),
                        f"{p}.mlp.dense_4h_to_h.weight": rand(hidden, ffn)})
    return weights


def phi3small_layout(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Phi-3-Small names and shapes (its modeling code): model.embed_tokens, model.layers.N.{input_layernorm,
    post_attention_layernorm} (LayerNorm weight and bias), self_attn.query_key_value ((heads + 2 x kv_heads) x
    head_dim rows, head-major, with bias), self_attn.dense, mlp.up_proj (2 x ff_intermediate_size rows), mlp.down_proj
    (all with bias), model.final_layernorm; no lm_head (tied to the embeddings)."""
    hidden, inter, vocab = config["hidden_size"], config["ff_intermediate_size"], config["vocab_size"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * hidden // config["num_attention_heads"]

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=generator) * std

    def linear(name, rows, columns):
        return {f"{name}.weight": rand(rows, columns), f"{name}.bias": rand(rows)}

    def norm(name):
        return {f"{name}.weight": 1 + rand(hidden), f"{name}.bias": rand(hidden)}

    weights = {"model.embed_tokens.weight": rand(vocab, hidden, std=0.5), **norm("model.final_layernorm")}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights.update({**norm(f"{p}.input_layernorm"), **norm(f"{p}.post_attention_layernorm"),
                        **linear(f"{p}.self_attn.query_key_value", qkv, hidden),
                        **linear(f"{p}.self_attn.dense", hidden, hidden),
                        **linear(f"{p}.mlp.up_proj", 2 * inter, hidden), **linear(f"{p}.mlp.down_proj", hidden, inter)})
    return weights


def jais_layout(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Jais names and GPT-2 Conv1D shapes (input x output): transformer.wte, transformer.relative_pe.slopes (the
    ALiBi slopes, heads x 1: the paper's geometric sequence 2^(-8/heads)^(h+1) for 2^k heads),
    transformer.h.N.{ln_1, attn.c_attn (hidden x 3 hidden: q | k | v), attn.c_proj, ln_2, mlp.c_fc, mlp.c_fc2
    (hidden x n_inner), mlp.c_proj (n_inner x hidden)}, each with a bias, transformer.ln_f; lm_head tied to wte."""
    hidden, inner, heads = config["n_embd"], config["n_inner"], config["n_head"]
    assert math.log2(heads).is_integer(), "the slopes below are the power-of-two case"

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=generator) * std

    def layer_norm(prefix):
        return {f"{prefix}.weight": 1 + rand(hidden), f"{prefix}.bias": rand(hidden)}

    start = 2 ** (-8 / heads)
    weights = {"transformer.wte.weight": rand(config["vocab_size"], hidden, std=0.5),
               "transformer.relative_pe.slopes": torch.tensor([[start ** (h + 1)] for h in range(heads)]),
               **layer_norm("transformer.ln_f")}
    shapes = {"attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden), "mlp.c_fc": (hidden, inner),
              "mlp.c_fc2": (hidden, inner), "mlp.c_proj": (inner, hidden)}
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}"
        weights.update({**layer_norm(f"{p}.ln_1"), **layer_norm(f"{p}.ln_2")})
        for name, shape in shapes.items():
            weights.update({f"{p}.{name}.weight": rand(*shape), f"{p}.{name}.bias": rand(shape[1])})
    return weights


def write_published_checkpoint(row: Architecture, folder: Path, seed: int = 0) -> Path:
    tokenizer = shared_tokenizer(name=row.tokenizer)
    config = published_config(row, tokenizer)
    layout = {"chatglm": chatglm_layout, "phi3small": phi3small_layout, "jais": jais_layout}.get(row.published_type, llama_layout)
    weights = layout(config, torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder

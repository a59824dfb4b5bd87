"""The classes of families that are not a transformers class as is: a reversible tensor conversion of the
published weights (Baichuan-7B, InternLM2, ChatGLM), a small native module (DeciLM, decilm.py), or both
(Baichuan2's normalised head, baichuan.py; DeepSeek-MoE's experts, deepseek_moe.py).

Each converted family gets a subclass of the native class that changes nothing but its name, under which
transformers' checkpoint conversion mapping (`register_checkpoint_conversion_mapping`, looked up by class name
before model_type) holds the conversion: `from_pretrained` applies it and `save_pretrained` applies its reverse,
so training, FSDP2 and PEFT see the native modules while the files on disk keep the published names.
Registration happens on the first load, not at import.
"""

from __future__ import annotations

import torch
from transformers import GlmForCausalLM, LlamaForCausalLM
from transformers.conversion_mapping import USER_REGISTERED_MAPPINGS, register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, ConversionOps, Split, WeightConverter, WeightRenaming

from automodel.models.families.baichuan import BaichuanAlibiLlamaForCausalLM, BaichuanLlamaForCausalLM
from automodel.models.families.decilm import DeciLMLlamaForCausalLM
from automodel.models.families.deepseek_moe import DeepseekMoeLlamaForCausalLM, deepseek_moe_experts
from automodel.models.families.phi3small import Phi3SmallLlamaForCausalLM
from automodel.models.families.jais import JaisGPT2LMHeadModel
from automodel.models.families.solar import SolarMistralForCausalLM


def baichuan_w_pack() -> list:
    return [WeightConverter("self_attn.W_pack.weight",
                            ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                            operations=[Chunk(dim=0)])]


class InternLM2LlamaForCausalLM(LlamaForCausalLM):
    """InternLM2: the Llama decoder under other names, with q, k, v fused per key/value head in `wqkv`."""


def _one(tensors):
    return tensors[0] if isinstance(tensors, list) else tensors


def _heads(config) -> tuple[int, int, int]:
    return config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads


class SplitGroupedQKV(ConversionOps):
    """InternLM2's `wqkv` rows are grouped per key/value head: for each of the kv heads, its
    heads/kv query heads, then its key head, then its value head (head_dim rows each)."""

    @torch.no_grad
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        heads, kv_heads, head_dim = _heads(kwargs["config"])
        fused = _one(next(iter(input_dict.values())))
        groups = fused.view(kv_heads, heads // kv_heads + 2, head_dim, fused.shape[-1])
        q = groups[:, :-2].reshape(heads * head_dim, -1)
        k, v = (groups[:, i].reshape(kv_heads * head_dim, -1) for i in (-2, -1))
        return dict(zip(target_patterns, (q.contiguous(), k.contiguous(), v.contiguous())))

    @property
    def reverse_op(self) -> ConversionOps:
        return FuseGroupedQKV()


class FuseGroupedQKV(ConversionOps):
    """The inverse of SplitGroupedQKV: q, k, v back into InternLM2's per-kv-head row groups."""

    @torch.no_grad
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        heads, kv_heads, head_dim = _heads(kwargs["config"])
        q, k, v = (_one(input_dict[pattern]) for pattern in source_patterns)
        width = q.shape[-1]
        groups = torch.cat([q.view(kv_heads, heads // kv_heads, head_dim, width),
                            k.view(kv_heads, 1, head_dim, width), v.view(kv_heads, 1, head_dim, width)], dim=1)
        return {target_patterns[0]: groups.reshape(-1, width)}


def internlm2_layout() -> list:
    renames = {r"^model\.tok_embeddings\.": "model.embed_tokens.", r"^output\.": "lm_head.",
               r"\.attention\.wo\.": ".self_attn.o_proj.", r"\.feed_forward\.w1\.": ".mlp.gate_proj.",
               r"\.feed_forward\.w3\.": ".mlp.up_proj.", r"\.feed_forward\.w2\.": ".mlp.down_proj.",
               r"\.attention_norm\.": ".input_layernorm.", r"\.ffn_norm\.": ".post_attention_layernorm."}
    return [WeightConverter("attention.wqkv.weight",
                            ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                            operations=[SplitGroupedQKV()]),
            *(WeightRenaming(source, target) for source, target in renames.items())]


class ChatGLMGlmForCausalLM(GlmForCausalLM):
    """ChatGLM2/3: transformers' GLM decoder (the same math: q/k/v biases, half-dimension interleaved rotary,
    fused gate-up MLP) under ChatGLM's names, with q, k, v fused as `query_key_value` ([q | k | v] rows)."""

    # The published checkpoints store the rotary frequencies, which GLM recomputes (non-persistent buffer).
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq$"]


def chatglm_layout() -> list:
    renames = {r"^transformer\.embedding\.word_embeddings\.": "model.embed_tokens.",
               r"^transformer\.encoder\.layers\.": "model.layers.",
               r"^transformer\.encoder\.final_layernorm\.": "model.norm.", r"^transformer\.output_layer\.": "lm_head.",
               r"\.self_attention\.dense\.": ".self_attn.o_proj.", r"\.mlp\.dense_h_to_4h\.": ".mlp.gate_up_proj.",
               r"\.mlp\.dense_4h_to_h\.": ".mlp.down_proj."}
    return [*(WeightRenaming(source, target) for source, target in renames.items()),
            WeightConverter("self_attention.query_key_value",
                            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], operations=[Split(dim=0)])]


# Class name -> (class, its checkpoint conversion or None: the published names are the module names).
CONVERTED = {"DeciLMLlamaForCausalLM": (DeciLMLlamaForCausalLM, None),
             "SolarMistralForCausalLM": (SolarMistralForCausalLM, None),
             "JaisGPT2LMHeadModel": (JaisGPT2LMHeadModel, None),
             "ChatGLMGlmForCausalLM": (ChatGLMGlmForCausalLM, chatglm_layout),
             "BaichuanLlamaForCausalLM": (BaichuanLlamaForCausalLM, baichuan_w_pack),
             "BaichuanAlibiLlamaForCausalLM": (BaichuanAlibiLlamaForCausalLM, baichuan_w_pack),
             "InternLM2LlamaForCausalLM": (InternLM2LlamaForCausalLM, internlm2_layout),
             "DeepseekMoeLlamaForCausalLM": (DeepseekMoeLlamaForCausalLM, deepseek_moe_experts),
             "Phi3SmallLlamaForCausalLM": (Phi3SmallLlamaForCausalLM, None)}


def converted_class(name: str):
    """The class, with its conversion registered once per process: under its name and under the name FSDP2 gives
    it (`fully_shard` swaps the class for an `FSDP<Name>` subclass, and transformers looks conversions up by class
    name, so a sharded model saves in the published layout too)."""
    model_class, conversion = CONVERTED[name]
    for class_name in (name, f"FSDP{name}"):
        if conversion is not None and class_name not in USER_REGISTERED_MAPPINGS:
            register_checkpoint_conversion_mapping(class_name, conversion())
    return model_class

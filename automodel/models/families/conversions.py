"""Families whose published weights differ from the native class's by a reversible tensor conversion.

Each gets a subclass of the native class that changes nothing but its name, under which transformers' checkpoint
conversion mapping (`register_checkpoint_conversion_mapping`, looked up by class name before model_type) holds
the conversion: `from_pretrained` applies it and `save_pretrained` applies its reverse, so training, FSDP2 and
PEFT see the native modules while the files on disk keep the published names. Registration happens on the first
load, not at import.
"""

from __future__ import annotations

from transformers import LlamaForCausalLM
from transformers.conversion_mapping import USER_REGISTERED_MAPPINGS, register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, WeightConverter


class BaichuanLlamaForCausalLM(LlamaForCausalLM):
    """Baichuan-7B: the Llama decoder whose checkpoints store q, k and v as one `self_attn.W_pack` (rows: q, then k,
    then v; Baichuan-7B has as many key/value heads as query heads, so three equal chunks)."""


def baichuan_w_pack() -> list:
    return [WeightConverter("self_attn.W_pack.weight",
                            ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                            operations=[Chunk(dim=0)])]


CONVERTED = {"BaichuanLlamaForCausalLM": (BaichuanLlamaForCausalLM, baichuan_w_pack)}


def converted_class(name: str):
    """The class, with its conversion registered once per process."""
    model_class, conversion = CONVERTED[name]
    if name not in USER_REGISTERED_MAPPINGS:
        register_checkpoint_conversion_mapping(name, conversion())
    return model_class

"""llama.cpp's conversion rules for each architecture we export: GGUF architecture, metadata and tensor changes.

The tensor names come from the `gguf` package (`gguf.get_tensor_name_map`, llama.cpp's own TensorNameMap) and the
metadata keys from its GGUFWriter. What the package does not hold are the per-architecture rules of llama.cpp's
converter, `convert_hf_to_gguf.py` (its `conversion/` classes, named in each row). That converter is not in any
installable package (it ships only in llama.cpp's source tree), reads a saved HF folder rather than a loaded model,
and buffers lazily whole models of tensors; so the rules are restated here, one `Rules` row per Hugging Face
`model_type` (the functions they name: rules_dense.py, rules_gpt.py, rules_moe.py, rules_mla.py,
rules_hybrid.py). They are few: which hparams each llama.cpp graph reads, Llama's Q/K row permutation (llama.cpp's
rope pairs neighbouring dimensions, HF's pairs halves), Gemma's and Nemotron's `1 + weight` norms, the fused QKV
layouts of GPT-NeoX and Falcon, the fused experts split into gate and up, DeepSeek's kv_b_proj split into its
absorbed halves, Mamba-2's A = -exp(A_log) and tensor shapes. llama.cpp itself checks every row in
tests/test_gguf_export.py.

Exported: llama, mistral, internlm3, exaone, exaone4, granite, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, phi,
stablelm, starcoder2, gpt_bigcode, gpt_neox, falcon, olmo, olmo2, cohere, cohere2, nemotron, glm, glm4, mixtral,
qwen2_moe, qwen3_moe, olmoe, granitemoe, granitemoeshared, deepseek_v2, deepseek_v3, minicpm3, bamba. Also the
remote-code families automodel reads into these native classes (gguf_out/families.py), written under the llama.cpp
architecture of the native class they are read into, by its rules: the loaded model IS that native model (a
translated config, weights renamed or split), so llama.cpp's graph for it computes the same math: Aquila, dense
DeepSeek, InternLM (q/k/v/o biases), InternLM2, Baichuan-7B and Baichuan2-7B (its head written normalised) as llama,
Orion as stablelm, MiniCPM as granite, ChatGLM2/3 as chatglm (llama.cpp checks them in
tests/test_gguf_export_families.py). A config using what llama.cpp's graph for its architecture lacks stops with one
line naming it (a rope type other than the row's, sliding-window Qwen2/3, StableLM's, Phi's or Command-R's q/k
norms, Falcon's ALiBi, biases or sequential attention, GPTBigCode without multi-query, Gemma 2/3's query scale other
than llama.cpp's, Gemma 3's attention soft-capping, EXAONE-4's sliding layers below 64 layers, grouped-query OLMoE,
dense layers or another top-k normalisation in the Qwen MoEs and OLMoE, DeepSeek without interleaved rope, MiniCPM3
with other muP scales than the published ones, Bamba with another Mamba-2 expansion than 2, projection biases, no
conv1d bias, a time-step clamp, or not both layer kinds), as does every other model_type (GPT-J: llama.cpp's
converter has no rules for it; the others: not restated here) and every family read into automodel's own modules but
these four (Solar, Phi-3-Small: families.py). A dynamic-NTK rope (InternLM, InternLM2) is written as plain rope,
which it equals up to max_position_embeddings, with a warning.

Also exported, by the loaded class (OWN_CLASS_RULES; rules_families.py): automodel's own modules of Jais (jais),
DeepSeek-MoE v1 (deepseek), DeciLM / Nemotron-NAS (deci) and Baichuan-13B / Baichuan2-13B (baichuan, ALiBi), each
stopping on what its llama.cpp graph lacks (Jais's 1/sqrt(head_dim) scores or other ALiBi slopes, DeepSeek-MoE's
renormalised top-k or moe_layer_freq, DeciLM's attention without FFN, ALiBi Baichuan of other than 40 layers).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from automodel.errors import UserError
from automodel.gguf_out import rules_dense as dense
from automodel.gguf_out import rules_families as own
from automodel.gguf_out import rules_gpt as gpt
from automodel.gguf_out import rules_hybrid as hybrid
from automodel.gguf_out import rules_mla as mla
from automodel.gguf_out import rules_moe as moe
from automodel.gguf_out.hparams import (
    Rules, head_dim, hparam, is_false, llama_tensor, norm_plus_one, rope_parameters, rope_types,
)

logger = logging.getLogger("automodel")

LLAMA_ROPES = ("default", "linear", "llama3")

RULES = {
    "llama": Rules("LLAMA", "LlamaModel", dense.llama_parameters, llama_tensor, LLAMA_ROPES),
    "mistral": Rules("LLAMA", "LlamaModel (MistralForCausalLM)", dense.llama_parameters, llama_tensor),
    "internlm3": Rules("LLAMA", "InternLM3Model", dense.llama_parameters, llama_tensor),
    "exaone": Rules("EXAONE", "ExaoneModel", dense.exaone_parameters, rope_types=LLAMA_ROPES),
    "exaone4": Rules("EXAONE4", "Exaone4Model", dense.exaone4_parameters, check=dense.exaone4_check),
    "granite": Rules("GRANITE", "GraniteModel", dense.granite_parameters, llama_tensor),
    "qwen2": Rules("QWEN2", "Qwen2Model", unsupported=(("use_sliding_window", is_false, "false"),)),
    "qwen3": Rules("QWEN3", "Qwen3Model", unsupported=(("use_sliding_window", is_false, "false"),)),
    "gemma": Rules("GEMMA", "GemmaModel", tensor=norm_plus_one, skipped=("lm_head.weight",)),
    "gemma2": Rules("GEMMA2", "Gemma2Model", dense.gemma2_parameters, norm_plus_one, skipped=("lm_head.weight",),
                    check=dense.query_scale_check),
    "gemma3_text": Rules("GEMMA3", "Gemma3Model", dense.gemma3_parameters, norm_plus_one,
                         skipped=("lm_head.weight",), check=dense.gemma3_check),
    "phi3": Rules("PHI3", "Phi3MiniModel", dense.phi3_parameters, rope_types=("default", "longrope")),
    "phi": Rules("PHI2", "Phi2Model", gpt.phi2_parameters, needs_output=True,
                 unsupported=(("qk_layernorm", is_false, "false"),)),
    "stablelm": Rules("STABLELM", "StableLMModel", dense.stablelm_parameters, needs_output=True,
                      unsupported=(("qk_layernorm", is_false, "false"),)),
    "starcoder2": Rules("STARCODER2", "StarCoder2Model"),
    "gpt_bigcode": Rules("STARCODER", "StarCoderModel", gpt.starcoder_parameters,
                         unsupported=(("multi_query", bool, "true"),)),
    "gpt_neox": Rules("GPTNEOX", "GPTNeoXModel", gpt.gptneox_parameters, gpt.gptneox_tensor, needs_output=True),
    "falcon": Rules("FALCON", "FalconModel", gpt.falcon_parameters, gpt.falcon_tensor, check=gpt.falcon_check),
    "olmo": Rules("OLMO", "OlmoModel", dense.olmo_parameters, dense.olmo_tensor),
    "olmo2": Rules("OLMO2", "Olmo2Model", dense.olmo2_parameters, needs_output=True),
    "cohere": Rules("COMMAND_R", "CommandR2Model", dense.cohere_parameters,
                    unsupported=(("use_qk_norm", is_false, "false"), ("attention_bias", is_false, "false"))),
    # (Cohere2Model drops all-zero biases and stops on others; llama.cpp's cohere2 has none)
    "cohere2": Rules("COHERE2", "Cohere2Model", dense.cohere2_parameters,
                     unsupported=(("attention_bias", is_false, "false"),)),
    "nemotron": Rules("NEMOTRON", "NemotronModel", dense.nemotron_parameters, norm_plus_one, needs_output=True),
    "glm": Rules("CHATGLM", "ChatGLMModel (GlmForCausalLM)", dense.chatglm_parameters),
    "glm4": Rules("GLM4", "Glm4Model", dense.glm4_parameters),
    "mixtral": Rules("LLAMA", "LlamaModel (MixtralForCausalLM)", dense.llama_parameters, llama_tensor,
                     split=moe.split_experts),
    "qwen2_moe": Rules("QWEN2MOE", "Qwen2MoeModel", moe.qwen2moe_parameters, needs_output=True,
                       split=moe.split_experts, check=moe.routing(normalised=False)),
    "qwen3_moe": Rules("QWEN3MOE", "Qwen3MoeModel", moe.qwen2moe_parameters, split=moe.split_experts,
                       check=moe.routing(normalised=True)),
    "olmoe": Rules("OLMOE", "OlmoeModel", needs_output=True, split=moe.split_experts,
                   check=moe.olmoe_check),
    "granitemoe": Rules("GRANITE_MOE", "GraniteMoeModel", moe.granitemoe_parameters, llama_tensor,
                        split=moe.split_experts),
    "deepseek_v2": Rules("DEEPSEEK2", "DeepseekV2Model", mla.deepseek_v2_parameters, rope_types=("default", "yarn"),
                         split=mla.split_deepseek, check=mla.deepseek_check),
    "deepseek_v3": Rules("DEEPSEEK2", "DeepseekV2Model (DeepseekV3ForCausalLM)", mla.deepseek_v3_parameters,
                         rope_types=("default", "yarn"), split=mla.split_deepseek, check=mla.deepseek_check),
    "minicpm3": Rules("MINICPM3", "MiniCPM3Model", mla.minicpm3_parameters, check=mla.minicpm3_check),
    "granitemoeshared": Rules("GRANITE_MOE", "GraniteMoeModel (GraniteMoeSharedForCausalLM)",
                              moe.granitemoe_parameters, llama_tensor, split=moe.split_experts),
    "bamba": Rules("GRANITE_HYBRID", "GraniteHybridModel (BambaForCausalLM)", hybrid.bamba_parameters,
                   hybrid.bamba_tensor, split=hybrid.split_mamba, check=hybrid.bamba_check,
                   unsupported=(("hidden_act", lambda act: act == "silu", "silu"),
                                ("mamba_expand", lambda expand: expand == 2, "an expansion of 2"),
                                ("mamba_conv_bias", bool, "the conv1d bias"),
                                ("mamba_proj_bias", is_false, "no in/out projection biases"))),
}


# automodel's own classes of remote-code families (automodel/models/families/), keyed by class name: their native
# config's model_type does not tell them apart (DeciLM and DeepSeek-MoE load as 'llama' configs with more fields)
OWN_CLASS_RULES = {
    "JaisGPT2LMHeadModel": own.JAIS,
    "DeepseekMoeLlamaForCausalLM": own.DEEPSEEK_MOE,
    "DeciLMLlamaForCausalLM": own.DECILM,
    "BaichuanAlibiLlamaForCausalLM": own.BAICHUAN_ALIBI,
}


def block_count(config: dict[str, Any]) -> int:
    return hparam(config, "num_hidden_layers", "n_layer")


def rules_for(config: dict[str, Any], model_class: str | None = None, warn: bool = True) -> Rules:
    """The export rules of a model config (of a model of class `model_class`: automodel's own classes have rows of
    their own), or a one-line error naming the architecture (`warn`: log what the file writes as its closest
    llama.cpp equivalent; the check before loading passes False, the writer says it)."""
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or [model_class or model_type])[0]
    if model_class in OWN_CLASS_RULES:
        rules = OWN_CLASS_RULES[model_class]
    elif model_type not in RULES:
        supported = ", ".join(sorted(RULES))
        raise UserError(f"--format gguf: {architecture} (model_type '{model_type}') has no GGUF export; "
                        f"supported model_types: {supported}")
    else:
        rules = RULES[model_type]
    for rope_type in sorted(rope_types(config)):
        if rope_type == "dynamic" and "default" in rules.rope_types:
            # transformers' dynamic NTK rescales the rope base only past max_position_embeddings
            if not warn:
                continue
            logger.warning("--format gguf: %s: its dynamic-NTK rope is written as plain rope, which it equals up to "
                           "max_position_embeddings (%s tokens, the file's context length); llama.cpp has no dynamic "
                           "NTK, and its own converter writes it the same way", architecture,
                           config.get("max_position_embeddings"))
            continue
        if rope_type not in rules.rope_types:
            raise UserError(f"--format gguf: {architecture} with rope type '{rope_type}' has no GGUF export "
                            f"(supported: {', '.join(rules.rope_types)})")
    for key, allowed, expected in rules.unsupported:
        if not allowed(config.get(key)):
            raise UserError(f"--format gguf: {architecture} with {key}={config.get(key)!r} has no GGUF export "
                            f"(llama.cpp's {rules.arch.lower()} needs {expected})")
    if rules.check is not None and (lacking := rules.check(config)) is not None:
        raise UserError(f"--format gguf: {architecture} with {lacking} has no GGUF export")
    return rules


def extra_tensors(rules: Rules, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """LlamaModel/ExaoneModel.generate_extra_tensors: Llama 3's rope frequency factors as the `rope_freqs` tensor;
    Phi3MiniModel's: LongRoPE's long and short factors (llama.cpp takes the long ones when its context is longer
    than the original, transformers when the sequence is)."""
    rope = rope_parameters(config)
    if rope["rope_type"] == "longrope":
        return {"rope_factors_long.weight": torch.tensor(rope["long_factor"], dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(rope["short_factor"], dtype=torch.float32)}
    if rope["rope_type"] != "llama3":
        return {}
    dim, base = head_dim(config), rope["rope_theta"] or 10000.0
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}


def linear_rope_parameters(writer, config: dict[str, Any]) -> None:
    """TextModel.set_gguf_parameters' linear rope scaling."""
    import gguf

    rope = rope_parameters(config)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])

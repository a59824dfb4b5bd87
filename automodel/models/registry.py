"""The supported-models table: the single source of truth for `automodel models`, the docs page
docs/supported_models.md and the rows the architecture tests run (tests/models/test_architectures.py).

Pure data, no torch/transformers import, so `automodel models` answers at once. Two neighbours hold what is not the
table: what a built model can take at run time (padding-free rows, the last layer on label rows) is
automodel/models/capabilities.py, and the tiny config each row's test builds is tests/models/tiny_configs.py.

Each tested row carries the leaf names of the modules LoRA's default `all-linear` must adapt and the real tokenizer
its test uses. Remote-code rows carry the reason they are not supported yet.
"""

from __future__ import annotations

from dataclasses import dataclass

TESTED = "tested"
PARTLY = "partly tested"  # some of the row's published variants load and are tested; the others stop with an error
NOT_YET = "not yet supported"

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
LLAMA_LIKE = ATTENTION + GATED_MLP
NEOX_LIKE = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
REMOTE_CODE = ("its modeling code exists only as remote code on the Hub (no transformers class); reading its "
               "checkpoints into native modules is a later issue")


@dataclass(frozen=True)
class Architecture:
    """One row of the supported-models table."""

    architecture: str                     # config.json `architectures` entry of the published checkpoints
    models: str
    checkpoints: tuple[str, ...]
    model_type: str | None = None         # None: remote code only
    native_class: str | None = None       # the transformers class that loads it
    kind: str = "dense"                   # dense | moe | hybrid | gpt2-style
    tokenizer: str | None = None          # folder under assets/tokenizers/ the test uses
    own_tokenizer: bool = False           # True: that is the family's real tokenizer; False: a stand-in
    lora_targets: tuple[str, ...] = ()    # leaf names `all-linear` adapts (never the output head)
    notes: str = ""                       # architecture-specific handling, documented
    reason: str = ""                      # why a remote-code row is not supported yet
    # Remote-code rows automodel reads itself (automodel/models/families): the published config.json
    # `model_type`, the transformers class its checkpoints load into, and the route (docs).
    published_type: str | None = None
    loads_into: str | None = None
    route: str = ""
    untested_variants: str = ""           # the row's published variants that are not supported (PARTLY)

    @property
    def status(self) -> str:
        if self.native_class:
            return TESTED
        if self.loads_into:
            return PARTLY if self.untested_variants else TESTED
        return NOT_YET

    @property
    def model_class(self) -> str | None:
        """The class a tiny model of the row trains as."""
        return self.native_class or self.loads_into

    @property
    def test_id(self) -> str:
        return self.architecture.split(" ")[0]


def _native(architecture, models, checkpoints, model_type, native_class, tokenizer, lora_targets=LLAMA_LIKE,
            kind="dense", own_tokenizer=False, notes="") -> Architecture:
    return Architecture(architecture, models, tuple(checkpoints), model_type, native_class, kind, tokenizer,
                        own_tokenizer, tuple(lora_targets), notes)


def _remote(architecture, models, checkpoints, reason=REMOTE_CODE) -> Architecture:
    return Architecture(architecture, models, tuple(checkpoints), reason=reason)


def _family(architecture, models, checkpoints, published_type, loads_into, tokenizer, route, notes="",
            lora_targets=LLAMA_LIKE, untested_variants="") -> Architecture:
    """A remote-code row read into a native class."""
    return Architecture(architecture, models, tuple(checkpoints), tokenizer=tokenizer,
                        lora_targets=tuple(lora_targets), notes=notes, published_type=published_type,
                        loads_into=loads_into, route=route, untested_variants=untested_variants)


MLA_ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
# The dense-layer and shared-expert MLPs, and the routed experts' fused parameters peft adds for their names.
DEEPSEEK_MLP = ("gate_proj", "up_proj", "down_proj", "experts.gate_up_proj", "experts.down_proj")
PEFT_MOE_REMAP = ("LoRA all-linear: peft 0.22's transformers-v4 compatibility maps the gate_proj/up_proj/down_proj "
                  "targets to the routed experts' fused parameters as well, so the routed experts get adapters next "
                  "to the dense-layer and shared-expert MLPs (automodel logs this)")

ARCHITECTURES: tuple[Architecture, ...] = (
    _family("AquilaForCausalLM", "Aquila, Aquila2", ["BAAI/Aquila-7B", "BAAI/AquilaChat-7B"], "aquila",
            "LlamaForCausalLM", "llama2", "config only: the Llama decoder under Aquila's names (same weight names)"),
    _family("BaiChuanForCausalLM", "Baichuan2, Baichuan",
            ["baichuan-inc/Baichuan2-13B-Chat", "baichuan-inc/Baichuan-7B"], "baichuan", "LlamaForCausalLM", "llama2",
            "one weight conversion: Baichuan-7B is the Llama decoder whose q, k, v are one `W_pack` (rows q, k, v); "
            "transformers' checkpoint conversion mapping splits it on load and concatenates it on save. Baichuan2-7B "
            "(`BaichuanForCausalLM` with `max_position_embeddings`) adds a small native module "
            "(automodel/models/families/baichuan.py): its lm_head L2-normalises each row before the matmul "
            "(NormHead), in training and inference alike (Baichuan2-7B's tiny checkpoint: "
            "tests/models/test_family_baichuan2_deepseek_moe.py). Baichuan-13B and Baichuan2-13B "
            "(`BaichuanForCausalLM` without `max_position_embeddings`, only `model_max_length`) load into another "
            "small native module of "
            "the same file (model_type baichuan_alibi): Llama's layers and the same `W_pack` conversion with ALiBi "
            "in place of rotary, the bias added to the scores as a float attention mask (eager, sdpa or "
            "automodel_sdpa; automodel/models/families/alibi.py, shared with Jais), the ALiBi paper's slopes for any "
            "head count (40: the 32 of 32 heads, then every other one of 64). Baichuan's own code adds "
            "`slope x key position` under the causal mask, this one `-slope x (query - key position)`: they differ "
            "by a constant per query row, to which softmax is invariant, so the attention is the same. Baichuan2-13B "
            "has NormHead; the two 13B configs differ only in the vocabulary (125696 vs 64000), which decides it "
            "(their tiny checkpoints; Baichuan-13B's also trained under 2-process FSDP2: "
            "tests/models/test_family_baichuan13b.py)",
            notes="LoRA adapters name q_proj/k_proj/v_proj (merge-lora writes W_pack back); Baichuan2's stored "
                  "lm_head is never normalised in place (its own code does so on the first eval forward: same "
                  "logits); `z_loss_weight` other than 0, and an ALiBi config whose vocabulary is neither 64000 nor "
                  "125696 or that names a rotary or ALiBi-scaling field, stop with a one-line error; the 13B "
                  "models take no flash/flex attention and no tensor parallelism; vLLM 0.32 no longer has "
                  "Baichuan (removed after 0.23), so it is checked against the reference forward only"),
    _native("BambaForCausalLM", "Bamba", ["ibm-ai-platform/Bamba-9B"], "bamba", "BambaForCausalLM", "llama2",
            ATTENTION + GATED_MLP + ("in_proj", "out_proj"), kind="hybrid",
            notes="layer 0 mamba2, layer 1 attention; on CPU the mamba mixer runs transformers' pure-torch path "
                  "(no mamba_ssm/causal_conv1d kernels needed)"),
    _family("ChatGLMModel / ChatGLMForConditionalGeneration", "ChatGLM", ["THUDM/chatglm2-6b", "THUDM/chatglm3-6b"],
            "chatglm", "GlmForCausalLM", "llama2",
            "one weight conversion onto transformers' GLM (the same decoder as GLM-4-9B): `query_key_value` "
            "([q | k | v] rows, with biases) split into q/k/v_proj, `dense_h_to_4h` ([gate | up]) is gate_up_proj, "
            "transformer.encoder.* renamed; rotary over half of each head in interleaved pairs "
            "(partial_rotary_factor 0.5), base 10000 x `rope_ratio`; `padded_vocab_size` is the vocabulary",
            lora_targets=ATTENTION + ("gate_up_proj", "down_proj"),
            notes="the saved folder omits the published `transformer.rotary_pos_emb.inv_freq` buffer (derived from "
                  "the config; ChatGLM's code and vLLM compute it); P-tuning prefixes (`pre_seq_len`) and "
                  "post-layernorm residuals stop with a one-line error"),
    _native("CohereForCausalLM", "Command-R", ["CohereForAI/c4ai-command-r-v01"], "cohere", "CohereForCausalLM",
            "llama2"),
    _native("Cohere2ForCausalLM", "Command-R7B", ["CohereForAI/c4ai-command-r7b-12-2024"], "cohere2",
            "Cohere2ForCausalLM", "llama2"),
    _family("DeciLMForCausalLM", "DeciLM", ["nvidia/Llama-3_3-Nemotron-Super-49B-v1"], "nemotron-nas",
            "LlamaForCausalLM", "llama2",
            "a small native module (automodel/models/families/decilm.py): LlamaForCausalLM whose decoder layers "
            "follow `block_configs`: a no_op attention or FFN is absent with its norm, n_heads_in_group sets the "
            "layer's KV heads, ffn_mult its MLP width (2/3 x ffn_mult x hidden rounded up to 256); Llama's weight "
            "names; `rope_scaling` llama3 becomes rope_parameters",
            notes="`replace_with_linear`, sparsity and sink/window attention entries stop with a one-line error "
                  "naming the block_configs entry"),
    _family("DeepseekForCausalLM", "DeepSeek", ["deepseek-ai/deepseek-llm-7b-chat"], "deepseek", "LlamaForCausalLM",
            "llama2", "config only: dense DeepSeek LLM v1 configs are the Llama decoder. DeepSeek-MoE "
            "(deepseek-moe-16b, `n_routed_experts` set) loads into a small native module "
            "(automodel/models/families/deepseek_moe.py): LlamaForCausalLM whose layers from `first_k_dense_replace` "
            "on (every `moe_layer_freq`-th) have transformers' DeepSeek-V2 MoE block (softmax top-k router, "
            "`norm_topk_prob` renormalisation, shared experts); per-expert weights are fused on load and split on "
            "save by transformers' MoE conversion (its tiny checkpoint, also trained under 2-process FSDP2: "
            "tests/models/test_family_baichuan2_deepseek_moe.py)",
            notes="the published deepseek-llm-7b/67b checkpoints are already `LlamaForCausalLM` configs; "
                  "DeepSeek-MoE: the published code's training-time router auxiliary loss (`aux_loss_alpha`, "
                  "`seq_aux`) is not computed (as for DeepSeek-V2/V3), so `model.output_router_logits` is an error; "
                  "LoRA all-linear adapts attention and the dense and shared-expert MLPs, not the routed experts "
                  "(fused 3-D parameters) nor the router; against vLLM 0.32's DeepseekForCausalLM "
                  "(`scripts/check_families_against_vllm.py OUT deepseek-moe`, head_dim 32, fp32): max |log p(ours) "
                  "- log p(vLLM)| 3.2e-06 over 23 prompt tokens"),
    _native("DeepseekV2ForCausalLM", "DeepSeek-V2", ["deepseek-ai/DeepSeek-V2-Lite"], "deepseek_v2",
            "DeepseekV2ForCausalLM", "llama2", MLA_ATTENTION + DEEPSEEK_MLP, kind="moe",
            notes="multi-head latent attention; layer 0 dense, layer 1 MoE. " + PEFT_MOE_REMAP),
    _native("DeepseekV3ForCausalLM", "DeepSeek-V3", ["deepseek-ai/DeepSeek-V3"], "deepseek_v3",
            "DeepseekV3ForCausalLM", "llama2", MLA_ATTENTION + DEEPSEEK_MLP, kind="moe",
            notes="multi-head latent attention; layer 0 dense, layer 1 MoE; routing balances by a bias buffer "
                  "(no auxiliary loss). " + PEFT_MOE_REMAP),
    _native("ExaoneForCausalLM", "EXAONE-3", ["LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct"], "exaone", "LlamaForCausalLM",
            "llama2", notes="transformers reads the EXAONE weight names (transformer.h.N.attn.attention...) into "
                            "LlamaForCausalLM and writes them back in that layout"),
    _native("Exaone4ForCausalLM", "EXAONE-4", ["LGAI-EXAONE/EXAONE-4.0-1.2B"], "exaone4", "Exaone4ForCausalLM",
            "llama2"),
    _native("FalconForCausalLM", "Falcon", ["tiiuae/falcon-7b", "tiiuae/falcon-40b", "tiiuae/falcon-rw-7b"],
            "falcon", "FalconForCausalLM", "gpt2", NEOX_LIKE),
    _native("GemmaForCausalLM", "Gemma", ["google/gemma-2b", "google/gemma-1.1-2b-it"], "gemma",
            "GemmaForCausalLM", "llama2", notes="embeddings scaled by sqrt(hidden) inside the transformers model"),
    _native("Gemma2ForCausalLM", "Gemma 2", ["google/gemma-2-9b"], "gemma2", "Gemma2ForCausalLM", "llama2",
            notes="attention and final-logit soft-capping; SDPA cannot soft-cap, so the default attention is "
                  "eager (see automodel/models/loader.py)"),
    _native("Gemma3ForCausalLM", "Gemma 3", ["google/gemma-3-1b-it"], "gemma3_text", "Gemma3ForCausalLM", "llama2",
            notes="sliding-window and global layers; q/k norms"),
    _native("GlmForCausalLM", "GLM-4", ["THUDM/glm-4-9b-chat-hf"], "glm", "GlmForCausalLM", "llama2",
            ATTENTION + ("gate_up_proj", "down_proj")),
    _native("Glm4ForCausalLM", "GLM-4-0414", ["THUDM/GLM-4-32B-0414"], "glm4", "Glm4ForCausalLM", "llama2",
            ATTENTION + ("gate_up_proj", "down_proj")),
    _native("GPTBigCodeForCausalLM", "StarCoder, SantaCoder, WizardCoder",
            ["bigcode/starcoder", "bigcode/gpt_bigcode-santacoder", "WizardLM/WizardCoder-15B-V1.0"],
            "gpt_bigcode", "GPTBigCodeForCausalLM", "gpt2", ("c_attn", "c_proj", "c_fc"), kind="gpt2-style",
            notes="multi-query attention; fused c_attn projection"),
    _native("GPTJForCausalLM", "GPT-J", ["EleutherAI/gpt-j-6b", "nomic-ai/gpt4all-j"], "gptj", "GPTJForCausalLM",
            "gpt2", ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"), kind="gpt2-style",
            own_tokenizer=True),
    _native("GPTNeoXForCausalLM", "GPT-NeoX, Pythia, OpenAssistant, Dolly V2, StableLM",
            ["EleutherAI/gpt-neox-20b", "EleutherAI/pythia-12b", "databricks/dolly-v2-12b",
             "stabilityai/stablelm-tuned-alpha-7b"], "gpt_neox", "GPTNeoXForCausalLM", "gpt2", NEOX_LIKE,
            kind="gpt2-style"),
    _native("GraniteForCausalLM", "Granite 3.0, Granite 3.1, PowerLM",
            ["ibm-granite/granite-3.0-2b-base", "ibm-granite/granite-3.1-8b-instruct", "ibm/PowerLM-3b"],
            "granite", "GraniteForCausalLM", "llama2",
            notes="embedding/residual/attention/logit multipliers inside the transformers model"),
    _native("GraniteMoeForCausalLM", "Granite 3.0 MoE, PowerMoE",
            ["ibm-granite/granite-3.0-1b-a400m-base", "ibm/PowerMoE-3b"], "granitemoe", "GraniteMoeForCausalLM",
            "llama2", ATTENTION, kind="moe"),
    _native("GraniteMoeSharedForCausalLM", "Granite MoE Shared", ["ibm-research/moe-7b-1b-active-shared-experts"],
            "granitemoeshared", "GraniteMoeSharedForCausalLM", "llama2", ATTENTION + ("input_linear", "output_linear"),
            kind="moe"),
    _native("GritLM", "GritLM", ["parasail-ai/GritLM-7B-vllm"], "mistral", "MistralForCausalLM", "mistral-7b-v0.1",
            own_tokenizer=True, notes="a Mistral checkpoint; trained here as a causal LM"),
    _family("InternLMForCausalLM", "InternLM", ["internlm/internlm-7b", "internlm/internlm-chat-7b"], "internlm",
            "LlamaForCausalLM", "llama2", "config only: Llama with `attention_bias` from `bias` (q, k, v and o "
            "biased); `rotary` {base, type origin or dynamic, scaling_factor} becomes rope_parameters"),
    _family("InternLM2ForCausalLM", "InternLM2", ["internlm/internlm2-7b", "internlm/internlm2-chat-7b"],
            "internlm2", "LlamaForCausalLM", "llama2",
            "one weight conversion: the Llama decoder under InternLM2's names (tok_embeddings, attention.wo, "
            "feed_forward.w1/w3/w2, attention_norm, ffn_norm, output); `wqkv` holds q, k, v grouped per key/value "
            "head and is split on load, regrouped on save (transformers' checkpoint conversion mapping); "
            "`rope_scaling` dynamic/linear becomes rope_parameters",
            notes="LoRA adapters name q_proj/k_proj/v_proj/o_proj/gate_proj/up_proj/down_proj (merge-lora writes "
                  "the InternLM2 names back); `bias: true` stops with a one-line error"),
    _native("InternLM3ForCausalLM", "InternLM3", ["internlm/internlm3-8b-instruct"], "internlm3", "LlamaForCausalLM",
            "llama2", notes="transformers loads the internlm3 config into LlamaForCausalLM"),
    _family("JAISLMHeadModel", "Jais", ["inceptionai/jais-13b", "inceptionai/jais-30b-v3"], "jais", "GPT2LMHeadModel",
            "gpt2",
            "a small native module (automodel/models/families/jais.py): GPT-2's blocks and Conv1D weight names with "
            "a SwiGLU MLP (c_fc x silu(c_fc2)), ALiBi (an additive bias to PyTorch's SDPA, padding-free rows kept "
            "apart by cu_seq_lens_q) and muP scalings (embeddings x `embeddings_scale`, logits x `width_scale`, "
            "scores / head_dim with `scale_qk_dot_by_d`); jais-30b's `mup_*` field names read the same",
            notes="`position_embedding_type` other than alibi (the later jais-family's learned/rotary positions) "
                  "and `alibi_scaling` stop with a one-line error naming the field. Differs from the published "
                  "code: attention is SDPA with an additive (batch, heads, tokens, tokens) ALiBi mask, no eager or "
                  "flash path; the muP learning-rate scalings are training-recipe choices the config does not apply. "
                  "No vLLM comparison: vLLM 0.32 rejects JAISLMHeadModel (supported until 0.22); the reference is "
                  "tests/models/test_family_jais.py's",
            lora_targets=("c_attn", "c_proj", "c_fc", "c_fc2")),
    _native("LlamaForCausalLM", "Llama 3.1, Llama 3, Llama 2, LLaMA, Yi",
            ["meta-llama/Meta-Llama-3.1-70B", "meta-llama/Llama-2-70b-hf", "01-ai/Yi-34B"], "llama",
            "LlamaForCausalLM", "llama2", own_tokenizer=True),
    _family("MiniCPMForCausalLM", "MiniCPM", ["openbmb/MiniCPM-2B-sft-bf16", "openbmb/MiniCPM-2B-dpo-bf16"],
            "minicpm", "GraniteForCausalLM", "llama2",
            "config only: Granite's multipliers: embedding_multiplier = `scale_emb`, residual_multiplier = "
            "`scale_depth` / sqrt(layers), logits_scaling = hidden_size / `dim_model_base`, attention 1/sqrt(head_dim)",
            notes="MiniCPM-MoE configs (`num_experts`) stop with a one-line error"),
    _native("MiniCPM3ForCausalLM", "MiniCPM3", ["openbmb/MiniCPM3-4B"], "minicpm3", "MiniCPM3ForCausalLM", "llama2",
            MLA_ATTENTION + GATED_MLP, notes="multi-head latent attention; muP embedding/depth scaling"),
    _native("MistralForCausalLM", "Mistral, Mistral-Instruct",
            ["mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1"], "mistral", "MistralForCausalLM",
            "mistral-7b-v0.1", own_tokenizer=True),
    _native("MixtralForCausalLM", "Mixtral-8x7B",
            ["mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1"], "mixtral", "MixtralForCausalLM",
            "mistral-7b-v0.1", ATTENTION, kind="moe", own_tokenizer=True,
            notes="checkpoint layout block_sparse_moe.experts.N.w1/w2/w3, fused on load by transformers"),
    _native("NemotronForCausalLM", "Nemotron-3, Nemotron-4, Minitron", ["nvidia/Minitron-8B-Base"], "nemotron",
            "NemotronForCausalLM", "llama2", ATTENTION + ("up_proj", "down_proj")),
    _native("OLMoForCausalLM", "OLMo", ["allenai/OLMo-1B-hf", "allenai/OLMo-7B-hf"], "olmo", "OlmoForCausalLM", "gpt2",
            notes="non-parametric layer norm"),
    _native("OLMo2ForCausalLM", "OLMo2", ["allenai/OLMo2-7B-1124"], "olmo2", "Olmo2ForCausalLM", "gpt2"),
    _native("OLMoEForCausalLM", "OLMoE", ["allenai/OLMoE-1B-7B-0924", "allenai/OLMoE-1B-7B-0924-Instruct"], "olmoe",
            "OlmoeForCausalLM", "gpt2", ATTENTION, kind="moe"),
    _family("OrionForCausalLM", "Orion", ["OrionStarAI/Orion-14B-Base", "OrionStarAI/Orion-14B-Chat"], "orion",
            "StableLmForCausalLM", "llama2", "config only: Llama with biased LayerNorm (eps `rms_norm_eps`) is "
            "StableLm with full rotary, sequential residuals, no q/k norm and no q/k/v bias"),
    _native("PhiForCausalLM", "Phi", ["microsoft/phi-1_5", "microsoft/phi-2"], "phi", "PhiForCausalLM", "gpt2",
            ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"), notes="partial rotary; parallel attention/MLP"),
    _native("Phi3ForCausalLM", "Phi-4, Phi-3",
            ["microsoft/Phi-4-mini-instruct", "microsoft/Phi-4", "microsoft/Phi-3-mini-4k-instruct"], "phi3",
            "Phi3ForCausalLM", "llama2", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
            notes="fused qkv_proj and gate_up_proj"),
    _family("Phi3SmallForCausalLM", "Phi-3-Small",
            ["microsoft/Phi-3-small-8k-instruct", "microsoft/Phi-3-small-128k-instruct"], "phi3small",
            "LlamaForCausalLM", "gpt2",
            "a small native module (automodel/models/families/phi3small.py) on LlamaForCausalLM under the published "
            "weight names: head-major fused `query_key_value` (biased), block-sparse attention on the layers "
            "`dense_attention_every_n_layers` does not make dense, as an exact mask over dense scores (eager/sdpa), "
            "gegelu MLP, biased LayerNorms, muP embedding/attention/logit scalings; the 128k checkpoints' LongRoPE "
            "`rope_scaling` (type \"su\": per-frequency `short_factor`/`long_factor`, "
            "`original_max_position_embeddings`, `short_mscale`/`long_mscale`) is transformers' \"longrope\" rotary, "
            "with each regime's own cos/sin scale where the config gives one",
            lora_targets=("query_key_value", "dense", "up_proj", "down_proj"),
            notes="block-sparse layers compute the dense score matrix and mask it (exact; the published Triton "
                  "kernel skips the masked blocks), so they cost what dense layers cost, hold a batch x heads x "
                  "tokens x tokens boolean mask (a padding-free row: its whole length squared) and need eager or sdpa "
                  "attention (flash and flex attention are refused at load); the published code's -inf logits for its "
                  "tokenizer's unused ids (`dummy_token_indices`, from its remote tokenizer, not config.json) are "
                  "not applied; LongRoPE picks the short or long factors by the longest position + 1 in the batch "
                  "(transformers), the published code by the padded sequence length: the same for unpadded and "
                  "right-padded batches, not for left-padded ones that cross original_max_position_embeddings; "
                  "other `rope_scaling` types stop with one line; reference forward and padding/cache checks: "
                  "tests/models/test_family_phi3small.py, Phi-3-small-128k (both LongRoPE regimes, LoRA, SFT, "
                  "round trip): tests/models/test_family_phi3small_128k.py (vLLM 0.32 dropped "
                  "Phi3SmallForCausalLM after 0.9.2, so there is no vLLM comparison)"),
    _native("Qwen2ForCausalLM", "QwQ, Qwen2", ["Qwen/QwQ-32B-Preview", "Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-7B"],
            "qwen2", "Qwen2ForCausalLM", "qwen", own_tokenizer=True),
    _native("Qwen2MoeForCausalLM", "Qwen2MoE", ["Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen1.5-MoE-A2.7B-Chat"],
            "qwen2_moe", "Qwen2MoeForCausalLM", "qwen", LLAMA_LIKE + ("shared_expert_gate",), kind="moe",
            own_tokenizer=True, notes="routed experts plus a gated shared expert"),
    _native("Qwen3ForCausalLM", "Qwen3", ["Qwen/Qwen3-8B"], "qwen3", "Qwen3ForCausalLM", "qwen", own_tokenizer=True),
    _native("Qwen3MoeForCausalLM", "Qwen3MoE", ["Qwen/Qwen3-30B-A3B"], "qwen3_moe", "Qwen3MoeForCausalLM", "qwen",
            ATTENTION, kind="moe", own_tokenizer=True),
    _native("StableLmForCausalLM", "StableLM", ["stabilityai/stablelm-3b-4e1t", "stabilityai/stablelm-base-alpha-7b-v2"],
            "stablelm", "StableLmForCausalLM", "gpt2", notes="partial rotary"),
    _native("Starcoder2ForCausalLM", "Starcoder2",
            ["bigcode/starcoder2-3b", "bigcode/starcoder2-7b", "bigcode/starcoder2-15b"], "starcoder2",
            "Starcoder2ForCausalLM", "gpt2", ATTENTION + ("c_fc", "c_proj")),
    _family("SolarForCausalLM", "Solar Pro", ["upstage/solar-pro-preview-instruct"], "solar", "MistralForCausalLM",
            "llama2",
            "a small native module (automodel/models/families/solar.py): MistralForCausalLM (Llama's weight names, "
            "`sliding_window`) whose decoder loop keeps the input of the `bskcn_1`/`bskcn_2` layers and blends it "
            "into the input of the `bskcn_3`/`bskcn_4` layers, weight `bskcn_tv[0]` in training and `bskcn_tv[1]` "
            "in inference",
            notes="`rope_scaling`, attention/MLP biases and blend lists that blend before anything is kept stop "
                  "with a one-line error naming the field. `sliding_window` limits every attention path as in "
                  "transformers' Mistral (a query sees its last `sliding_window` keys); vLLM 0.32's Solar attends to "
                  "all earlier tokens, so the two differ past that many tokens. Against vLLM 0.32 (inference blend, "
                  "window wider than the prompt): max |log p| difference 2.9e-06 over 23 prompt tokens"),
)

BY_NAME: dict[str, Architecture] = {row.architecture: row for row in ARCHITECTURES}

# Rows trained under 2-process FSDP2 (gloo) by tests/models/test_fsdp2_architectures.py, with the modes run there;
# each matches a single-process run step for step. One dense, the MoE, hybrid and GPT-2-style families.
FSDP2_VERIFIED: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": ("sft", "lora"),
    "MixtralForCausalLM": ("sft",),
    "Qwen3MoeForCausalLM": ("sft", "lora"),
    "OLMoEForCausalLM": ("sft",),
    "GraniteMoeForCausalLM": ("sft",),
    "DeepseekV3ForCausalLM": ("sft",),
    "BambaForCausalLM": ("sft",),
    "GPTBigCodeForCausalLM": ("sft", "lora"),
    "GPTJForCausalLM": ("sft",),
    "GPTNeoXForCausalLM": ("sft",),
    # Remote-code families read by automodel/models/families: the saved folders are in the published layout.
    "AquilaForCausalLM": ("sft",),
    "BaiChuanForCausalLM": ("sft",),
    "ChatGLMModel / ChatGLMForConditionalGeneration": ("sft", "lora"),
    "DeciLMForCausalLM": ("sft",),
    "DeepseekForCausalLM": ("sft",),
    "InternLMForCausalLM": ("sft",),
    "InternLM2ForCausalLM": ("sft",),
    "MiniCPMForCausalLM": ("sft",),
    "OrionForCausalLM": ("sft",),
    "Phi3SmallForCausalLM": ("sft",),
    "JAISLMHeadModel": ("sft",),
}

def native_rows() -> list[Architecture]:
    """Rows transformers loads natively (the published model_type is transformers')."""
    return [row for row in ARCHITECTURES if row.native_class]


def family_rows() -> list[Architecture]:
    """Remote-code rows automodel reads into a native class itself (automodel/models/families)."""
    return [row for row in ARCHITECTURES if row.loads_into]


def tested_rows() -> list[Architecture]:
    return [row for row in ARCHITECTURES if row.status in (TESTED, PARTLY)]


def remote_rows() -> list[Architecture]:
    """Rows not supported yet."""
    return [row for row in ARCHITECTURES if row.status == NOT_YET]

"""The supported-models table as text (`automodel models`) and as the docs page (`--markdown`).

docs/supported_models.md is this module's markdown output; tests/models/test_registry.py fails when they differ.
No torch import here.
"""

from __future__ import annotations

from automodel.models.registry import (ARCHITECTURES, FSDP2_VERIFIED, PARTLY, Architecture, family_rows,
                                      remote_rows, tested_rows)

VERIFIED = [
    "loads from a local folder in the architecture's Hugging Face layout (config.json with its `architectures` and "
    "`model_type`, safetensors) through the normal `model.pretrained_model_name_or_path` config path",
    "LoRA with the default `target_modules: all-linear` adapts exactly the listed projection layers, never the "
    "output head; 3 optimizer steps change every adapter weight and no base weight",
    "full SFT: 3 optimizer steps change every trainable parameter; the losses are finite",
    "the saved output reloads (`PeftModel.from_pretrained` on the base, or `AutoModelForCausalLM.from_pretrained`) "
    "with logits equal to the trained model's; full SFT writes the same weight names as the input checkpoint",
    "activation checkpointing (`distributed.activation_checkpointing: true`), full SFT and LoRA: every decoder layer "
    "is recomputed in backward, and the loss and all gradients of one backward equal those without it (fp32, "
    "rtol 1e-5; `tests/models/test_activation_checkpointing.py`)",
]

FSDP2_TEXT = (
    "2-process FSDP2 (gloo, `distributed.strategy: fsdp2`) is verified for the rows with an entry in the FSDP2 column "
    "(`FSDP2_VERIFIED` in the registry; one dense, the MoE, hybrid and GPT-2-style families): "
    "`tests/models/test_fsdp2_architectures.py` trains 3 steps of global batch 2 in two processes and in one, and "
    "asserts equal per-step losses (fp32, rtol 1e-5) and a consolidated `model/` folder with the same tensors "
    "(within 1e-5). Rows marked `-` have not been run under FSDP2.")

FAMILIES_TEXT = (
    "Rows loading as `model_type -> class (automodel)` are remote-code-only on the Hub: automodel reads their "
    "published checkpoints (config.json with the family's own `architectures`, `model_type`, `auto_map` and field "
    "names; the family's weight names) into the transformers class with the same math, with `trust_remote_code` "
    "off (automodel/models/families), and writes config.json back in the published layout. Their tiny test "
    "checkpoints are written in that published layout, not by transformers. On top of the list above, "
    "`tests/models/test_families.py` (Phi-3-Small, Solar Pro, Jais, Baichuan2, Baichuan-13B and DeepSeek-MoE: "
    "`test_family_<model_type>.py`) checks our forward pass "
    "against a reference forward written in the test "
    "from the family's published description, that load + save returns every tensor bit for bit and the "
    "config.json unchanged, and that a config field automodel does not translate stops with a one-line error "
    "naming it (exit 2). `scripts/check_families_against_vllm.py` compares our prompt log-probabilities with vLLM's "
    "own implementation of each family it has (vLLM's CPU engine in .venv-vllm); the suite runs it for ChatGLM, "
    "InternLM2 and Solar Pro (`tests/models/test_families_vllm.py`), the rows' notes give the other differences. LoRA adapters of these "
    "rows name the native modules, which are the published module names for the config-only routes below. "
    "The routes:")

HANDLING = [
    "Gemma: embeddings scaled by sqrt(hidden); Granite, MiniCPM3: embedding/residual/logit multipliers; Cohere: "
    "logit scale. All inside the transformers model; nothing for automodel to do.",
    "Gemma 2: attention and final-logit soft-capping. SDPA cannot soft-cap, so Gemma2ForCausalLM offers only eager "
    "attention; `model.attn_implementation` is unset by default so transformers picks sdpa where an architecture "
    "supports it and eager otherwise (asking for `sdpa` on Gemma 2 is a one-line error).",
    "MoE router auxiliary loss: with `model.output_router_logits: true` the recipe adds `router_aux_loss_coef x "
    "aux_loss` (the coefficient from the model config, overridable as `model.router_aux_loss_coef`) to the training "
    "loss and logs `router_aux_loss` per step (automodel/models/router_aux_loss.py). Mixtral, Qwen2MoE, Qwen3MoE, OLMoE, "
    "GraniteMoe and GraniteMoeShared compute one; DeepSeek-V2/V3 in transformers do not (V3 balances with a bias), "
    "so enabling it there is an error.",
    "MoE experts: transformers 5 stores routed experts as fused 3-D parameters, not `nn.Linear` modules, so "
    "`all-linear` LoRA adapts attention (and dense or shared-expert MLPs) but not the routed experts or the "
    "router; full SFT trains them all. DeepSeek-V2/V3 are the exception: see their rows.",
    "Bamba: its mamba2 layers run transformers' pure-torch path on CPU (no mamba_ssm / causal_conv1d kernels "
    "needed); the CUDA kernels are used when installed.",
    "EXAONE-3 and InternLM3 checkpoints load into LlamaForCausalLM; transformers renames EXAONE's weights "
    "(transformer.h.N.attn.attention...) on load and back on save, so the output keeps the EXAONE layout.",
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def text_table() -> str:
    """What `automodel models` prints: one line per row with its status."""
    header = ("ARCHITECTURE", "MODELS", "STATUS", "MODEL_TYPE", "EXAMPLE CHECKPOINT")
    lines = [(r.architecture, r.models, r.status, r.model_type or r.published_type or "-", r.checkpoints[0])
             for r in ARCHITECTURES]
    widths = [min(max(len(row[i]) for row in [header, *lines]), 34) for i in range(4)]  # long cells are cut

    def fit(cell: str, width: int) -> str:
        return (cell if len(cell) <= width else cell[:width - 3] + "...").ljust(width)

    def fmt(row):
        return "  ".join(fit(cell, width) for cell, width in zip(row, widths)) + "  " + row[4]

    remote = remote_rows()
    out = [fmt(header), *map(fmt, lines), "",
           f"{len(tested_rows())} tested{partly_text()} (tiny model of each trained with LoRA and full SFT, saved "
           "and reloaded: see docs/supported_models.md)",
           f"{len(remote)} not yet supported: {remote[0].reason}" if remote else ""]
    return "\n".join(out).rstrip() + "\n"


def partly_text() -> str:
    partly = [row for row in tested_rows() if row.status == PARTLY]
    return f", {len(partly)} of them partly ({', '.join(r.test_id for r in partly)})" if partly else ""


def _native_line(row: Architecture) -> str:
    if row.loads_into:
        loads = f"{row.published_type} -> {row.loads_into} (automodel)"
    else:
        loads = row.model_type if row.native_class == row.test_id else f"{row.model_type} -> {row.native_class}"
    tokenizer = f"{row.tokenizer}" + ("" if row.own_tokenizer else " (stand-in)")
    fsdp2 = ", ".join(mode.upper() if mode == "sft" else "LoRA" for mode in FSDP2_VERIFIED.get(row.architecture, ()))
    return (f"| `{row.architecture}` | {_cell(row.models)} | {', '.join(row.checkpoints)} | {loads} | {row.kind} | "
            f"{', '.join(f'`{t}`' for t in row.lora_targets)} | {fsdp2 or '-'} | {tokenizer} | "
            f"{_cell(row.notes) or '-'} |")


def markdown_page() -> str:
    """docs/supported_models.md."""
    native, remote = tested_rows(), remote_rows()
    parts = [
        "# Supported models",
        "",
        "Generated from `automodel/models/registry.py` by `automodel models --markdown > docs/supported_models.md`; "
        "a test fails when this page and the registry differ. `automodel models` prints the same table with each "
        "row's status.",
        "",
        f"## Tested ({len(native)} architectures)",
        "",
        "Status `tested` means `tests/models/test_architectures.py` builds a tiny model of the architecture "
        "(2 layers, hidden 64, few heads and experts, the vocabulary of the listed real tokenizer), writes it with "
        "`save_pretrained` and runs it through `FinetuneRecipe` with a user-style config on real SQuAD rows. "
        "For every row it verifies:",
        "",
        *[f"- {item}" for item in VERIFIED],
        "",
        FSDP2_TEXT,
        "",
        FAMILIES_TEXT,
        "",
        *[f"- `{r.architecture}` ({r.published_type} -> {r.loads_into}): {r.route}"
          + (f". Partly tested: {r.untested_variants}" if r.untested_variants else "") for r in family_rows()],
        "",
        "A tokenizer marked (stand-in) is a real tokenizer of another family: the family's own one is not in the "
        "offline assets. Only the vocabulary size of the tiny model depends on it.",
        "",
        "| architecture | models | example checkpoints | model_type -> class | kind | LoRA `all-linear` targets "
        "| 2-process FSDP2 | test tokenizer | notes |",
        "|---|---|---|---|---|---|---|---|---|",
        *map(_native_line, native),
        "",
        f"## Not yet supported ({len(remote)} architectures)",
        "",
        "| architecture | models | example checkpoints | status | reason |",
        "|---|---|---|---|---|",
        *[f"| `{r.architecture}` | {_cell(r.models)} | {', '.join(r.checkpoints)} | {r.status} | {r.reason} |"
          for r in remote],
        "",
        "## Architecture-specific handling",
        "",
        *[f"- {item}" for item in HANDLING],
    ]
    return "\n".join(parts) + "\n"


__all__ = ["markdown_page", "text_table"]

"""`automodel export --format gguf` of the remote-code families automodel reads into its own classes
(automodel/models/families/), checked by llama.cpp itself as tests/test_gguf_export.py checks the native families:
greedy tokens equal to `automodel generate`'s, logits within LOGIT_TOLERANCE of ours (derived there), the prompts
tokenised alike.

Each checkpoint is a tiny one in the family's PUBLISHED layout (tests/models/published.py, the families' training
tests' checkpoints) with its real tokenizer beside it, exported from that folder as a user would, and each sets
what llama.cpp's graph for the family needs where the training tests' tiny config differs: DeepSeek-MoE's top-k
weights used as they are (deepseek-moe-16b's norm_topk_prob false); DeciLM's layers as llama.cpp's deci runs them
(an attention-free layer, a layer with neither part, two KV-head counts, two FFN widths; no attention without FFN),
and again with Llama 3's rope scaling, as the published ones have it (test_llamacpp_runs_decilm_with_llama3_rope);
Baichuan-13B's 40 layers (llama.cpp's baichuan takes ALiBi from the 13B layer count), narrow, with 6 heads (40 is
no power of two either), and Baichuan2-13B's NormHead.

Cost, measured with --durations on 2 cores shared with other agents (load average ~4): this file ~62 s.
Baichuan-13B 13.2 s (40 layers), Jais 11.9 s (the first test: the imports), Baichuan2-13B 10.3 s (one prompt),
DeciLM 7.6 s, DeciLM with Llama 3's rope 9.6 s, DeepSeek-MoE 6.7 s, the refusals 0.1 to 1 s each. llama.cpp
runs them in a 64-token context: its ALiBi masks every cell of the context at each step, which in the default 2048
took 30 s for Baichuan-13B alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from automodel.cli.main import main
from automodel.models.registry import BY_NAME
from tests.models.published import variant_row, write_published_checkpoint
from tests.models.tiny import shared_tokenizer
from tests.models.tiny_configs import variant
from tests.test_gguf_export import PROMPTS, check_against_llamacpp, check_float32_rounding, export

pytestmark = pytest.mark.slow

DECI_BLOCKS = [
    {"attention": {"no_op": False, "n_heads_in_group": 2, "replace_with_linear": False},
     "ffn": {"no_op": False, "ffn_mult": 1.0, "replace_with_linear": False}},
    {"attention": {"no_op": True, "n_heads_in_group": None, "replace_with_linear": False},
     "ffn": {"no_op": False, "ffn_mult": 7.0, "replace_with_linear": False}},
    {"attention": {"no_op": True, "n_heads_in_group": None, "replace_with_linear": False},
     "ffn": {"no_op": True, "ffn_mult": None, "replace_with_linear": False}},
    {"attention": {"no_op": False, "n_heads_in_group": 4, "replace_with_linear": False},
     "ffn": {"no_op": False, "ffn_mult": 1.0, "replace_with_linear": False}},
]
# family -> (the published row, the config fields over its tiny ones, the class automodel reads it into)
FAMILIES = {
    "jais": (BY_NAME["JAISLMHeadModel"], {}, "JaisGPT2LMHeadModel"),
    "deepseek-moe": (variant_row("deepseek-moe"), dict(norm_topk_prob=False), "DeepseekMoeLlamaForCausalLM"),
    "decilm": (BY_NAME["DeciLMForCausalLM"], dict(num_hidden_layers=4, block_configs=DECI_BLOCKS),
               "DeciLMLlamaForCausalLM"),
}
BAICHUAN_13B = ("baichuan-13b", "baichuan2-13b")
# Baichuan2-13B adds only its normalised head to Baichuan-13B's graph, and its 125,696-token vocabulary makes each
# prompt cost ~3 s over 40 layers on both sides: one prompt checks the head.
PROMPTS_OF = {"baichuan2-13b": PROMPTS[:1]}


def published_folder(family: str, folder: Path) -> Path:
    """The family's tiny published checkpoint with its tokenizer saved beside it."""
    if family in BAICHUAN_13B:
        from tests.models.test_family_baichuan13b import ROW, write_checkpoint

        write_checkpoint(family, folder, num_hidden_layers=40)
        tokenizer = ROW.tokenizer
    else:
        row, fields, _ = FAMILIES[family]
        write_published_checkpoint(variant(row, **fields) if fields else row, folder)
        tokenizer = row.tokenizer
    shared_tokenizer(name=tokenizer).save_pretrained(folder)
    return folder


def loaded_class(family: str) -> str:
    return "BaichuanAlibiLlamaForCausalLM" if family in BAICHUAN_13B else FAMILIES[family][2]


@pytest.mark.parametrize("family", [*FAMILIES, *BAICHUAN_13B])
def test_llamacpp_runs_the_f32_export_of_each_own_family(family, tmp_path, llamacpp_python):
    from automodel.inference.generate import Generator

    folder = published_folder(family, tmp_path / "model")
    gguf_file = export(folder, tmp_path / "out" / "model.gguf")
    generator = Generator.load(str(folder), dtype="float32", device="cpu")
    assert type(generator.model).__name__ == loaded_class(family)  # the own class is what ran on our side
    # (a context of 64 holds the prompts and their new tokens: llama.cpp's ALiBi masks every cell of its context)
    check_against_llamacpp(generator, gguf_file, llamacpp_python, tmp_path, PROMPTS_OF.get(family, PROMPTS), n_ctx=64)
    check_float32_rounding(generator.model, generator.tokenizer)


def edited_folder(family: str, folder: Path, **fields) -> Path:
    published_folder(family, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return folder


# Configs of these families that need what llama.cpp's graph lacks, each stopped before the weights are read:
# (family, config fields, what the one-line refusal names).
LLAMACPP_LACKS = [
    ("jais", dict(scale_qk_dot_by_d=False), "scores / sqrt(head_dim)"),
    ("deepseek-moe", dict(norm_topk_prob=True), "norm_topk_prob=True"),
    ("deepseek-moe", dict(moe_layer_freq=2), "moe_layer_freq=2"),
    ("decilm", dict(block_configs=[DECI_BLOCKS[1], *DECI_BLOCKS[1:]]), "no attention in layer 0"),
    ("decilm", dict(block_configs=[{**DECI_BLOCKS[0], "ffn": DECI_BLOCKS[2]["ffn"]}, *DECI_BLOCKS[1:]]),
     "attention without FFN in layer 0"),
    ("decilm", dict(block_configs=[*DECI_BLOCKS[:3], DECI_BLOCKS[2]]), "neither attention nor FFN in the last"),
    ("baichuan-13b", dict(num_hidden_layers=2), "num_hidden_layers=2"),
]


@pytest.mark.parametrize(("family", "fields", "named"), LLAMACPP_LACKS,
                         ids=[f"{case[0]}-{next(iter(case[1]))}" for case in LLAMACPP_LACKS])
def test_configs_llamacpp_cannot_run_stop_with_one_line(family, fields, named, tmp_path, capsys):
    folder = edited_folder(family, tmp_path / "model", **fields)
    capsys.readouterr()
    assert main(["export", str(folder), "--format", "gguf", "--output", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert named in err and "has no GGUF export" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.gguf").exists()


def test_jais_with_other_alibi_slopes_stops_with_one_line(tmp_path, capsys):
    """A Jais checkpoint whose stored ALiBi slopes are not the paper's (llama.cpp recomputes those from
    max_alibi_bias) stops once loaded, before anything is written."""
    jais = published_folder("jais", tmp_path / "jais")
    weights = load_file(jais / "model.safetensors")
    weights["transformer.relative_pe.slopes"] = weights["transformer.relative_pe.slopes"] * 0.5
    save_file(weights, jais / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["export", str(jais), "--format", "gguf", "--output", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "JaisGPT2LMHeadModel with ALiBi slopes other than the ALiBi paper's" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.gguf*"))


# Llama 3's rope scaling, as the Nemotron-NAS models (Llama 3.1/3.3 derived) publish it, on an original context
# short enough that the tiny head's frequencies fall in all three of its bands (llama.cpp: the rope_freqs tensor)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def test_llamacpp_runs_decilm_with_llama3_rope(tmp_path, llamacpp_python):
    """A published Nemotron-NAS folder with Llama 3's rope, exported as a user would: transformers cannot read its
    config.json as a bare config (its AutoTokenizer did, for the unknown model_type, and failed on this rope), so
    the tokenizer loads with the native config (automodel/models/families `tokenizer_config`)."""
    from automodel.inference.generate import Generator

    row, fields, _ = FAMILIES["decilm"]
    folder = write_published_checkpoint(variant(row, **fields, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
                                        tmp_path / "model")
    shared_tokenizer(name=row.tokenizer).save_pretrained(folder)
    gguf_file = export(folder, tmp_path / "out" / "model.gguf")
    generator = Generator.load(str(folder), dtype="float32", device="cpu")
    assert generator.model.config.rope_parameters["rope_type"] == "llama3"
    check_against_llamacpp(generator, gguf_file, llamacpp_python, tmp_path, PROMPTS, n_ctx=64)

"""`automodel export --format gguf`, checked by llama.cpp itself (llama-cpp-python in .venv-llamacpp, built by
scripts/setup_llamacpp.sh when missing) and read back by transformers' GGUF reader.

For one tiny random model per exported family (tests/models/tiny.py, real tokenizers) and for the SmolLM2 main job's
LoRA fine-tune (merged on export), the F32 file run in llama.cpp gives the same greedy tokens as `automodel
generate` and logits within LOGIT_TOLERANCE of ours, llama.cpp tokenises the prompts as transformers does, and the
file read back through `model.gguf_file` holds our weights exactly.

LOGIT_TOLERANCE, derived: both sides compute the same float32 forward in a different order, so they differ by
rounding, which grows with the magnitude of what is summed. A float32 forward of these models differs from the same
forward in float64 by at most ~1e-6 of the largest logit (measured: check_float32_rounding asserts it on each
model, in the same test); llama.cpp adds its own rounding of the same kind, plus, for GELU models (Gemma 1/2/3,
StarCoder, StarCoder2, Phi, GPT-NeoX, Falcon), its GELU read from a float16 table (relative error <= 2^-11 ~ 5e-4
per activation, which the residual stream carries to the logits at that relative size). So 2^-11 of the largest
|logit| bounds every model with margin over the float32 part (measured here: <= 6e-7 for the SiLU/ReLU^2 models,
1.3e-4 to 3.2e-4 for the GELU ones); a wrong export (a permutation, a missed norm offset, a wrong rope dimension,
a missing soft-cap or multiplier) moves the logits by a large fraction of their size.

Bamba's Mamba-2 scan is float32 reordering of the same kind: transformers scans in chunks (exponentials of
cumulative sums within a chunk, states passed between chunks), llama.cpp token by token. transformers keeps the scan
in float32 in a float64 model, so check_float32_rounding does not cover it for Bamba; measured once against a
float64 token-by-token scan, Bamba's float32 forward is within 4.4e-7 of the largest logit (the chunked scan's own
share 1.2e-7), so the same bound holds (llama.cpp's logits: 4.8e-7). Wrong Bamba exports measured against it: the
converter's whole-head Q/K permutation 3.4x the bound (the attention of a tiny random model is near uniform, so rope
errors move its logits least), no permutation 2.7x, A_log written as is, a transposed grouped norm, D and dt_bias
swapped 280x and more (the last two only with EXPORT_CHECK_VARIED: at transformers' initialisation they are ones).

Cost, measured with --durations on 2 cores shared with other agents (load average ~4.5): this file 3m29s, of
which the 34 tiny families 3m07s. The 26 families beyond the first 8 add 100 s (2.1 to 5.8 s each: export ~2 s,
most of it loading the tokenizer twice; llama.cpp's load and run ~1 s; our forward, generation and float64 forward
~1 s), the Q8_0 MoE check 6 s, the config refusals well under 1 s; folding the rounding premise into each family's
test saved the 18 s its own test took. Qwen2 (~55 s on an idle machine with its read-back, since dropped: the
151k-token tokenizer), Llama (the first test: the imports), Mistral, Qwen3 and the Q4_K_M check are most of the
rest. Bamba, added later, 12 to 15 s at load ~7
(its transformers forwards for generation ~4 s, the export ~4 s, most of it the tokenizer), its F16 check 8 to 9 s.
The first run builds llama.cpp (~5 minutes on 2 idle cores, ~25 on these busy ones).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from automodel.cli.main import main
from automodel.models.registry import ARCHITECTURES
from tests.conftest import ASSETS, REPO_ROOT

pytestmark = pytest.mark.slow

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "stablelm", "starcoder2", "internlm3", "exaone",
            "exaone4", "granite", "gemma2", "gemma3_text", "olmo", "olmo2", "phi", "gpt_neox", "falcon", "gpt_bigcode",
            "cohere", "cohere2", "nemotron", "glm", "glm4", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe",
            "granitemoeshared", "deepseek_v2", "deepseek_v3", "minicpm3", "bamba"]
# What a family's tiny model sets here beyond its training tests' config: a window shorter than the prompts plus
# the generated tokens (so llama.cpp's sliding layers really slide), soft-capping that binds on these small logits,
# Granite's published multipliers, a Cohere2 global layer (no rope), and the published values of what llama.cpp's
# graph hard-codes (Qwen3-MoE renormalises the top-k weights; OLMoE has as many KV heads as heads; EXAONE-4 below
# 64 layers, as the 1.2B model, has no sliding layers), and DeepSeek's YaRN rope (the published models' scaling, on
# an original context shorter than the prompts' positions reach in its low frequencies).
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
            rope_theta=10000.0)
EXPORT_CHECK_FIELDS = {
    "gemma2": dict(sliding_window=4, attn_logit_softcapping=0.05, final_logit_softcapping=0.5),
    "gemma3_text": dict(sliding_window=4),
    "cohere2": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "granite": dict(embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
                    logits_scaling=8.0),
    "granitemoe": dict(embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
                       logits_scaling=8.0),
    "qwen3_moe": dict(norm_topk_prob=True),
    "olmoe": dict(num_key_value_heads=4),
    "exaone4": dict(sliding_window=None, layer_types=["full_attention", "full_attention"]),
    # Phi-4-mini's shape: LongRoPE over 3/4 of each head, a 128k context from 4k (llama.cpp picks the short factors
    # for its 2048-token context, as transformers does for these short prompts; the attention factor is 1.19)
    "phi3": dict(max_position_embeddings=131072, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75, original_max_position_embeddings=4096,
        long_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0], short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5])),
    "deepseek_v2": dict(rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
    "deepseek_v3": dict(rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0)),
    "granitemoeshared": dict(embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
                             logits_scaling=8.0),
    # a Mamba-2 layer, then an attention layer (the training tests' [1]); two groups of heads sharing B and C (the
    # published models have one: this checks the head-to-group order and the grouped norm), and chunks shorter than
    # the prompts, so that transformers' scan carries its state across chunks as llama.cpp's does across tokens
    "bamba": dict(attn_layer_indices=[1], mamba_n_groups=2, mamba_chunk_size=4),
}
# Families whose tiny model has parameters that transformers initialises to one constant and whose export moves or
# reshapes them (Bamba's D and dt_bias, ones, and its grouped norm): spread around that constant, so that a swapped
# or misshapen one shows in the logits.
EXPORT_CHECK_VARIED = {"bamba"}
# The Qwen MoE rows with GPT-2's 50k-token tokenizer rather than Qwen's 151k: what they add is the expert layout,
# and the Qwen tokenizer, which costs ~10 s a model here (export, llama.cpp's load), is checked by qwen2 and qwen3.
EXPORT_CHECK_TOKENIZER = {"qwen2_moe": "gpt2", "qwen3_moe": "gpt2"}
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def add(a, b):\n    return"]
NEW_TOKENS = 8
# the families transformers' GGUF reader reads back (its Qwen3 reader ignores attention.key_length; it has no
# reader for granitehybrid, Bamba's llama.cpp architecture: Bamba is checked in llama.cpp only). Not Qwen2: its
# reader would parse the 151k-token vocabulary again (~30 s here) for what the llama rows already check of the
# reader's weight mapping; llama.cpp checks the Qwen2 file's weights through its logits.
READ_BACK = ["llama", "mistral"]
LOGIT_TOLERANCE = 2.0 ** -11  # of the largest |logit|; derived in the module docstring


def run_llamacpp(python: Path, model: Path, work: Path, prompts: list[list[int]], texts=(), answers=(),
                 logits=True, max_new_tokens=NEW_TOKENS, n_ctx=2048) -> tuple[dict, list[np.ndarray]]:
    request = work / "request.json"
    request.write_text(json.dumps({"model": str(model), "prompts": prompts, "texts": list(texts),
                                   "answers": list(answers), "logits": logits, "max_new_tokens": max_new_tokens,
                                   "n_ctx": n_ctx}))
    subprocess.run([str(python), str(REPO_ROOT / "scripts" / "llamacpp_run.py"), str(request), str(work)],
                   check=True, timeout=600)
    result = json.loads((work / "result.json").read_text())
    return result, [np.load(work / f"logits_{i}.npy") for i in range(len(prompts))] if logits else []


def tiny_model_folder(model_type: str, folder: Path, tokenizer: str | None = None, **fields) -> Path:
    """A tiny random checkpoint of the family (with `fields` on its tiny config), with its real tokenizer (or the
    named one of assets/tokenizers) saved beside it (what a user exports)."""
    import dataclasses

    from tests.models.tiny import shared_tokenizer, write_tiny_checkpoint
    from tests.models.tiny_configs import variant

    row = next(r for r in ARCHITECTURES if r.model_type == model_type)
    row = dataclasses.replace(row, tokenizer=tokenizer or row.tokenizer)
    write_tiny_checkpoint(variant(row, **fields) if fields else row, folder)
    shared_tokenizer(name=row.tokenizer).save_pretrained(folder)
    return folder


def export(model: Path, output: Path, type_name: str = "f32", *extra: str) -> Path:
    assert main(["export", str(model), "--format", "gguf", "--type", type_name, "--output", str(output),
                 *extra]) == 0
    return output


def check_against_llamacpp(generator, gguf_file: Path, python: Path, work: Path, prompts: list[str],
                           n_ctx: int = 2048) -> None:
    """Greedy tokens equal to `automodel generate`'s, logits within the tolerance, tokenisation equal."""
    from automodel.inference.generate import GenerationSettings

    tokenizer, model = generator.tokenizer, generator.model
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    result, theirs = run_llamacpp(python, gguf_file, work, ids, texts=prompts, n_ctx=n_ctx)
    assert result["tokenized"] == ids
    ours = generator.generate(prompts, GenerationSettings(max_new_tokens=NEW_TOKENS))
    assert [tokenizer.decode(t, skip_special_tokens=True).strip() for t in result["greedy"]] == ours
    for prompt_ids, their_logits in zip(ids, theirs):
        with torch.no_grad():
            our_logits = model(torch.tensor([prompt_ids])).logits[0].numpy()
        scale = np.abs(our_logits).max()
        assert np.abs(our_logits - their_logits).max() <= LOGIT_TOLERANCE * scale
        # the same greedy continuation as token ids, not only as text
        with torch.no_grad():
            generated = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        ours_ids = generated[0, len(prompt_ids):].tolist()
        if tokenizer.eos_token_id in ours_ids:
            ours_ids = ours_ids[:ours_ids.index(tokenizer.eos_token_id)]
        assert result["greedy"][ids.index(prompt_ids)] == ours_ids


def check_read_back(model, gguf_file: Path) -> None:
    """transformers' GGUF reader (`model.gguf_file`) gives our weights back exactly from the F32 file."""
    from automodel.models import load_causal_lm
    from automodel.models.gguf import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:  # its dequantised copy goes beside the file, not in the user cache
        patch.setenv(CACHE_ENV, str(gguf_file.parent / "cache"))
        back = load_causal_lm(str(gguf_file.parent), gguf_file=gguf_file.name, dtype="float32")
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor.float(), theirs[name]), name


@pytest.mark.parametrize("model_type", FAMILIES)
def test_llamacpp_runs_the_f32_export_of_each_family(model_type, tmp_path, llamacpp_python):
    from automodel.inference.generate import Generator

    folder = tiny_model_folder(model_type, tmp_path / "model", EXPORT_CHECK_TOKENIZER.get(model_type),
                               **EXPORT_CHECK_FIELDS.get(model_type, {}))
    if model_type in EXPORT_CHECK_VARIED:
        vary_constant_parameters(folder)
    # (a file named after Mistral would make transformers' reader take its Llama architecture for Mistral's)
    gguf_file = export(folder, tmp_path / "out" / "model.gguf")
    generator = Generator.load(str(folder), dtype="float32", device="cpu")
    check_against_llamacpp(generator, gguf_file, llamacpp_python, tmp_path, PROMPTS)
    if model_type in READ_BACK:
        check_read_back(generator.model, gguf_file)
    check_float32_rounding(generator.model, generator.tokenizer)


def vary_constant_parameters(folder: Path) -> None:
    """Re-save the checkpoint with every parameter whose elements are all equal moved by uniform noise in
    [-0.25, 0.25) (its config.json kept as written)."""
    from transformers import AutoModelForCausalLM

    config = (folder / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                parameter.add_(torch.rand(parameter.shape, generator=noise) / 2 - 0.25)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(config)


def check_float32_rounding(model, tokenizer) -> None:
    """The tolerance derivation's premise: a float32 forward is within 1e-6 of the largest logit of a float64 one
    (the model is float64 afterwards). An MoE model's experts run as a loop of matmuls here: transformers' grouped
    matmul has no float64 kernel."""
    if model.config._experts_implementation != "eager":
        model.set_experts_implementation("eager")
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        single = model(ids).logits[0].double()
        double = model.double()(ids).logits[0]
    assert (single - double).abs().max() <= 1e-6 * double.abs().max()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    folder = tiny_model_folder("gptj", tmp_path / "gptj")
    olmoe = tiny_model_folder("olmoe", tmp_path / "olmoe")
    llama = tiny_model_folder("llama", tmp_path / "llama")
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"x")
    capsys.readouterr()  # the tiny checkpoints' own save messages
    cases = {
        "GPTJForCausalLM (model_type 'gptj') has no GGUF export": [str(folder), "--type", "f16"],
        # a config needing what llama.cpp's graph lacks: grouped-query OLMoE
        "OLMoEForCausalLM with num_key_value_heads=2 (llama.cpp's olmoe needs as many as num_attention_heads, 4) "
        "has no GGUF export": [str(olmoe), "--type", "f16"],
        "unknown GGUF type 'q9_9'": [str(llama), "--type", "q9_9"],
        "already exists": [str(llama), "--output", str(existing)],
    }
    for message, args in cases.items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        output = [] if "--output" in args else ["--output", str(tmp_path / "new.gguf")]
        assert main(["export", *args, "--format", "gguf", *output]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert existing.read_bytes() == b"x"


# Configs of exported families that need what llama.cpp's graph for them lacks: (model_type, config fields, what the
# one-line refusal names). Published examples: Gemma-2-27B-like scaling on another depth, Falcon-RW's ALiBi, the
# EXAONE-4 default (32 layers with sliding ones), Qwen3-MoE without renormalised top-k, Phi-3.5-MoE-style dense
# layers in a Qwen2-MoE, SantaCoder-style multi-head GPTBigCode, Command-R+'s q/k norms, a YaRN Llama, a DeepSeek-V3
# whose rope pairs halves, a MiniCPM3 with another embedding scale, a Bamba with a wider Mamba-2 mixer, projection
# biases, a time-step clamp, or no attention layer (BambaConfig's default).
LLAMACPP_LACKS = [
    ("gemma2", dict(head_dim=256, query_pre_attn_scalar=144), "query_pre_attn_scalar=144"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    ("falcon", dict(alibi=True), "alibi=True"),
    ("exaone4", {}, "sliding-window layers in 32 layers"),
    ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob=False"),
    ("qwen2_moe", dict(mlp_only_layers=[0]), "mlp_only_layers=[0]"),
    ("gpt_bigcode", dict(multi_query=False), "multi_query=False"),
    ("cohere", dict(use_qk_norm=True), "use_qk_norm=True"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                    "original_max_position_embeddings": 4096}), "rope type 'yarn'"),
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave=False"),
    ("minicpm3", dict(scale_emb=10), "scale_emb=10"),
    ("bamba", dict(attn_layer_indices=[1], mamba_expand=4), "mamba_expand=4"),
    ("bamba", dict(attn_layer_indices=[1], mamba_proj_bias=True), "mamba_proj_bias=True"),
    ("bamba", dict(attn_layer_indices=[1], time_step_limit=(0.0, 0.1)), "time_step_limit="),
    ("bamba", {}, "attn_layer_indices=None"),
]


@pytest.mark.parametrize(("model_type", "fields", "named"), LLAMACPP_LACKS, ids=[c[0] for c in LLAMACPP_LACKS])
def test_configs_llamacpp_cannot_run_stop_with_one_line(model_type, fields, named):
    from transformers import AutoConfig

    from automodel.errors import UserError
    from automodel.gguf_out.architectures import rules_for

    config = AutoConfig.for_model(model_type, **fields).to_dict()
    with pytest.raises(UserError) as raised:
        rules_for(config)
    message = str(raised.value)
    assert named in message and "has no GGUF export" in message and "\n" not in message, message


def test_k_quants_need_llama_cpps_quantizer(tmp_path, capsys, monkeypatch):
    """Without llama-quantize on PATH or llama_cpp in this Python: one line saying how to get it."""
    if shutil.which("llama-quantize"):
        pytest.skip("llama-quantize is on PATH here")
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama_cpp is importable here")
    llama = tiny_model_folder("llama", tmp_path / "llama")
    capsys.readouterr()
    assert main(["export", str(llama), "--format", "gguf", "--type", "Q4_K_M", "--output",
                 str(tmp_path / "q.gguf")]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp's quantizer is not installed" in err and "setup_llamacpp.sh" in err
    assert not (tmp_path / "q.gguf").exists()


def test_k_quant_through_llama_cpps_quantizer_runs_in_llamacpp(tmp_path, llamacpp_python):
    from automodel.inference.generate import Generator

    # rows of 256 values: a k-quant's block (narrower rows get llama.cpp's fallback types)
    folder = tiny_model_folder("llama", tmp_path / "model", hidden_size=256, intermediate_size=512)
    gguf_file = export(folder, tmp_path / "q4.gguf", "Q4_K_M", "--quantizer", str(llamacpp_python))
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(gguf_file).tensors}
    assert {"Q4_K", "Q6_K"} <= types, types  # Q4_K_M: Q6_K for some of the tensors
    generator = Generator.load(str(folder), dtype="float32", device="cpu")
    ids = [generator.tokenizer(p)["input_ids"] for p in PROMPTS]
    result, _ = run_llamacpp(llamacpp_python, gguf_file, tmp_path, ids, logits=False)
    assert [len(t) for t in result["greedy"]] == [NEW_TOKENS] * len(PROMPTS)


def test_q8_0_keeps_routers_f32_and_runs_in_llamacpp(tmp_path, llamacpp_python):
    """llama.cpp's converter keeps MoE routers F32 in a quantised file; the experts' 3-D tensors are Q8_0."""
    from gguf import GGUFReader

    folder = tiny_model_folder("qwen2_moe", tmp_path / "model", "gpt2")
    gguf_file = export(folder, tmp_path / "q8.gguf", "Q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(gguf_file).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_down_exps.weight"] == "Q8_0"
    from tests.models.tiny import shared_tokenizer

    prompt = shared_tokenizer(name="gpt2")(PROMPTS[0])["input_ids"]
    result, _ = run_llamacpp(llamacpp_python, gguf_file, tmp_path, [prompt], logits=False)
    assert len(result["greedy"][0]) == NEW_TOKENS


def test_f16_keeps_mamba_conv1d_f32_and_runs_in_llamacpp(tmp_path, llamacpp_python):
    """llama.cpp's ssm_conv takes F32 weights only (its converter keeps ssm_conv1d F32 in every type): a Bamba
    export of the default type, F16, runs in llama.cpp."""
    from gguf import GGUFReader

    folder = tiny_model_folder("bamba", tmp_path / "model")
    gguf_file = export(folder, tmp_path / "f16.gguf", "F16")
    types = {t.name: t.tensor_type.name for t in GGUFReader(gguf_file).tensors}
    assert types["blk.0.ssm_conv1d.weight"] == "F32" and types["blk.0.ssm_in.weight"] == "F16"
    from tests.models.tiny import shared_tokenizer

    prompt = shared_tokenizer(name="llama2")(PROMPTS[0])["input_ids"]
    result, _ = run_llamacpp(llamacpp_python, gguf_file, tmp_path, [prompt], logits=False)
    assert len(result["greedy"][0]) == NEW_TOKENS

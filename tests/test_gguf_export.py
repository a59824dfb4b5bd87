"""`automodel export --format gguf`, checked by llama.cpp itself (llama-cpp-python in .venv-llamacpp, built by
scripts/setup_llamacpp.sh when missing) and read back by transformers' GGUF reader.

For one tiny random model per exported family (tests/models/tiny.py, real tokenizers) and for the SmolLM2 main job's
LoRA fine-tune (merged on export), the F32 file run in llama.cpp gives the same greedy tokens as `automodel
generate` and logits within LOGIT_TOLERANCE of ours, llama.cpp tokenises the prompts as transformers does, and the
file read back through `model.gguf_file` holds our weights exactly.

LOGIT_TOLERANCE, derived: both sides compute the same float32 forward in a different order, so they differ by
rounding, which grows with the magnitude of what is summed. A float32 forward of these models differs from the same
forward in float64 by at most ~1e-6 of the largest logit (measured: test_our_float32_rounding_is_far_below_the_
tolerance asserts it on each model); llama.cpp adds its own rounding of the same kind, plus, for GELU models
(Gemma, StarCoder2), its GELU read from a float16 table (relative error <= 2^-11 ~ 5e-4 per activation, which the
residual stream carries to the logits at that relative size). So 2^-11 of the largest |logit| bounds every model
with margin over the float32 part; a wrong export (a permutation, a missed norm offset, a wrong rope dimension)
moves the logits by a large fraction of their size.

Cost, measured on 2 cores shared with ~20 other processes: the 8 tiny families ~10 minutes together (~1 minute
each: export, llama.cpp, our forward and generation), the rounding premise ~2 minutes, the rest ~3 minutes; on an idle
machine a fraction of that. The first run builds llama.cpp (~5 minutes on 2 idle cores, ~25 on these busy ones).
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

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "stablelm", "starcoder2"]
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def add(a, b):\n    return"]
NEW_TOKENS = 8
# the families transformers' GGUF reader reads back (its Qwen3 reader ignores attention.key_length)
READ_BACK = ["llama", "mistral", "qwen2"]
LOGIT_TOLERANCE = 2.0 ** -11  # of the largest |logit|; derived in the module docstring


def run_llamacpp(python: Path, model: Path, work: Path, prompts: list[list[int]], texts=(), answers=(),
                 logits=True, max_new_tokens=NEW_TOKENS) -> tuple[dict, list[np.ndarray]]:
    request = work / "request.json"
    request.write_text(json.dumps({"model": str(model), "prompts": prompts, "texts": list(texts),
                                   "answers": list(answers), "logits": logits, "max_new_tokens": max_new_tokens}))
    subprocess.run([str(python), str(REPO_ROOT / "scripts" / "llamacpp_run.py"), str(request), str(work)],
                   check=True, timeout=600)
    result = json.loads((work / "result.json").read_text())
    return result, [np.load(work / f"logits_{i}.npy") for i in range(len(prompts))] if logits else []


def tiny_model_folder(model_type: str, folder: Path) -> Path:
    """A tiny random checkpoint of the family, with its real tokenizer saved beside it (what a user exports)."""
    from tests.models.tiny import shared_tokenizer, write_tiny_checkpoint

    row = next(r for r in ARCHITECTURES if r.model_type == model_type)
    write_tiny_checkpoint(row, folder)
    shared_tokenizer(name=row.tokenizer).save_pretrained(folder)
    return folder


def export(model: Path, output: Path, type_name: str = "f32", *extra: str) -> Path:
    assert main(["export", str(model), "--format", "gguf", "--type", type_name, "--output", str(output),
                 *extra]) == 0
    return output


def check_against_llamacpp(generator, gguf_file: Path, python: Path, work: Path, prompts: list[str]) -> None:
    """Greedy tokens equal to `automodel generate`'s, logits within the tolerance, tokenisation equal."""
    from automodel.inference.generate import GenerationSettings

    tokenizer, model = generator.tokenizer, generator.model
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    result, theirs = run_llamacpp(python, gguf_file, work, ids, texts=prompts)
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

    folder = tiny_model_folder(model_type, tmp_path / "model")
    # (a file named after Mistral would make transformers' reader take its Llama architecture for Mistral's)
    gguf_file = export(folder, tmp_path / "out" / "model.gguf")
    generator = Generator.load(str(folder), dtype="float32", device="cpu")
    check_against_llamacpp(generator, gguf_file, llamacpp_python, tmp_path, PROMPTS)
    if model_type in READ_BACK:
        check_read_back(generator.model, gguf_file)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_our_float32_rounding_is_far_below_the_tolerance(model_type, tmp_path):
    """The derivation's premise: a float32 forward is within 1e-6 of the largest logit of a float64 one."""
    from automodel.inference.generate import load_model_and_tokenizer
    from automodel.inference.sources import resolve_source

    folder = tiny_model_folder(model_type, tmp_path / "model")
    model, tokenizer = load_model_and_tokenizer(resolve_source(str(folder)), "float32", device="cpu")
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        single = model(ids).logits[0].double()
        double = model.double()(ids).logits[0]
    assert (single - double).abs().max() <= 1e-6 * double.abs().max()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    folder = tiny_model_folder("gpt_neox", tmp_path / "neox")
    llama = tiny_model_folder("llama", tmp_path / "llama")
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"x")
    capsys.readouterr()  # the tiny checkpoints' own save messages
    cases = {
        "GPTNeoXForCausalLM (model_type 'gpt_neox') has no GGUF export": [str(folder), "--type", "f16"],
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

    folder = tiny_model_folder("qwen2", tmp_path / "model")
    gguf_file = export(folder, tmp_path / "q4.gguf", "Q4_K_M", "--quantizer", str(llamacpp_python))
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(gguf_file).tensors}
    assert "Q4_K" in types or "Q5_0" in types or "Q6_K" in types, types
    generator = Generator.load(str(folder), dtype="float32", device="cpu")
    ids = [generator.tokenizer(p)["input_ids"] for p in PROMPTS]
    result, _ = run_llamacpp(llamacpp_python, gguf_file, tmp_path, ids, logits=False)
    assert [len(t) for t in result["greedy"]] == [NEW_TOKENS] * len(PROMPTS)

"""GGUF checkpoints as a model source, on the real SmolLM2-135M-Instruct Q4_1 file of the shared assets.

The first load dequantises the file into the cache ($AUTOMODEL_CACHE/gguf, ~40 s on 2 cores); these tests use a
cache of their own, so that copy is made by the code under test, and then read that folder, as every run does.
"""

from __future__ import annotations

import logging
import logging.handlers
import subprocess
import sys

import numpy as np
import pytest
import torch

from automodel.errors import UserError
from automodel.inference.sources import resolve_source
from automodel.models import load_causal_lm, load_tokenizer
from automodel.models.gguf import INSTALL, cache_root, file_sha256
from tests.conftest import ASSETS, REPO_ROOT

SMOL = ASSETS / "models" / "SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory):
    """A cache of this module's own, so the copies are made by the code under test (as on a fresh machine)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOMODEL_CACHE", str(tmp_path_factory.mktemp("automodel_cache")))
        yield


@pytest.fixture(scope="module")
def smol():
    return load_causal_lm(str(SMOL), gguf_file=SMOL_FILE), load_tokenizer(str(SMOL), gguf_file=SMOL_FILE)


def test_the_dequantised_model_is_the_file_and_answers(smol):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, tokenizer = smol
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # gguf's own reader and dequantiser, independent of transformers: the same numbers, bit for bit.
    tensor = next(t for t in GGUFReader(SMOL / SMOL_FILE).tensors if t.name == "blk.3.ffn_down.weight")
    expected = dequantize(tensor.data, tensor.tensor_type).reshape(model.config.hidden_size, -1)
    assert np.array_equal(model.model.layers[3].mlp.down_proj.weight.detach().numpy(), expected)
    assert tokenizer.convert_ids_to_tokens(tokenizer("Answer: Denver")["input_ids"]) == ["Answer", ":", "ĠDenver"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])
    folders = list(cache_root().glob(f"{SMOL_FILE[:-5]}-{file_sha256(SMOL / SMOL_FILE)[:16]}"))
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()


def test_complete_says_which_answers_ended_with_eos(smol):
    from automodel.inference.generate import GenerationSettings, Generator

    model, tokenizer = smol
    generator = Generator(model.eval(), tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    [(answer, ended)] = generator.complete([prompt], GenerationSettings(max_new_tokens=24))
    [(cut, cut_ended)] = generator.complete([prompt], GenerationSettings(max_new_tokens=3))
    assert ended and "Paris" in answer, answer
    assert not cut_ended and answer.startswith(cut)
    assert generator.generate([prompt], GenerationSettings(max_new_tokens=24)) == [answer]


def test_the_streamed_copy_is_transformers_dequantisation_tensor_for_tensor(smol):
    """The copy written tensor by tensor (gguf's reader, transformers' name map and Q/K permutation) holds what
    transformers' whole-model from_pretrained makes of the file, bit for bit in float32; a bfloat16 run gets
    its own copy (its own cache folder), which is that float32 copy cast."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    [fp32_folder] = cache_root().glob(f"{SMOL_FILE[:-5]}-{file_sha256(SMOL / SMOL_FILE)[:16]}")
    streamed = load_file(fp32_folder / "model.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(SMOL, gguf_file=SMOL_FILE, dtype=torch.float32)
    want = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    assert streamed.keys() == want.keys() and all(torch.equal(streamed[k], want[k]) for k in want)
    saved = json.loads((fp32_folder / "config.json").read_text())
    assert {k: v for k, v in reference.config.to_diff_dict().items()
            if k not in ("quantization_config", "_name_or_path")} == saved

    model = load_causal_lm(str(SMOL), gguf_file=SMOL_FILE, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    [bf16_folder] = cache_root().glob(f"{fp32_folder.name}-bfloat16")
    in_bf16 = load_file(bf16_folder / "model.safetensors")
    assert in_bf16.keys() == want.keys()
    assert all(in_bf16[k].dtype == torch.bfloat16 and torch.equal(in_bf16[k], want[k].bfloat16()) for k in want)
    assert json.loads((bf16_folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_gguf_base_builds_on_the_meta_device_from_its_dequantised_copy(smol, caplog):
    """The recipe's build reads the dequantised copy shard by shard: the same LoRA model as the whole-model load."""
    from automodel.models.build import build_in_full, build_model, lora_settings, model_section

    cfg = {"model": {"pretrained_model_name_or_path": str(SMOL), "gguf_file": SMOL_FILE},
           "peft": {"target_modules": ["q_proj", "v_proj"], "dim": 4}}
    torch.manual_seed(3)
    full = build_in_full(model_section(cfg), lora_settings(cfg), None, torch.device("cpu"))
    torch.manual_seed(3)
    with caplog.at_level(logging.INFO, logger="automodel"):
        meta = build_model(cfg)
    assert f"each process reads its shard of {cache_root()}" in caplog.text
    want, got = full.state_dict(), meta.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_bad_gguf_settings_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"model.gguf_file: .* has no other.gguf \(GGUF files there: " + SMOL_FILE):
        load_causal_lm(str(SMOL), gguf_file="other.gguf")
    with pytest.raises(UserError, match="model.gguf_file: expected the name of a .gguf file"):
        load_causal_lm(str(SMOL), gguf_file="model.bin")
    with pytest.raises(UserError, match="has no config.json"):
        load_causal_lm(str(SMOL))


def test_missing_gguf_package_names_the_install_command():
    # A None entry in sys.modules is how Python marks a module that cannot be imported.
    code = ("import sys; sys.modules['gguf'] = None; from automodel.cli.main import main; "
            f"sys.exit(main(['generate', {str(SMOL / SMOL_FILE)!r}, '--prompt', 'Hi']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and INSTALL in errors[0] and "gguf" in errors[0]


def test_sources_resolve_a_gguf_file_or_folder(tmp_path):
    by_file = resolve_source(str(SMOL / SMOL_FILE))
    by_folder = resolve_source(str(SMOL))
    for source in (by_file, by_folder):
        assert (source.base, source.gguf_file, source.adapter) == (str(SMOL), SMOL_FILE, None)
    assert by_file.describe() == f"{SMOL} (GGUF {SMOL_FILE})" and by_file.model_folder is None
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="nor one .gguf file"):
        resolve_source(str(tmp_path))


def test_serve_refuses_a_gguf_base_without_merging(tmp_path):
    from automodel.inference.vllm import prepare_for_vllm

    with pytest.raises(UserError, match="the base is the GGUF file .*--merge"):
        prepare_for_vllm(resolve_source(str(SMOL / SMOL_FILE)), tmp_path / "out", "smol")
    assert not (tmp_path / "out").exists()


def test_a_second_process_waits_for_the_copy_being_made_and_reads_it(tmp_path, monkeypatch):
    """The ranks of a job (or two jobs) on one machine dequantise a GGUF file once: a loader that finds the copy's
    lock held waits, then reads the copy the holder published, instead of dequantising the file a second time."""
    import fcntl
    import threading

    from automodel.models import gguf
    from tests.test_gguf_export import export, tiny_model_folder

    gguf_file = export(tiny_model_folder("llama", tmp_path / "tiny"), tmp_path / "tiny.gguf")
    monkeypatch.setenv("AUTOMODEL_CACHE", str(tmp_path / "cache"))
    folder = gguf.cache_root() / gguf.copy_name(gguf_file)
    folder.parent.mkdir(parents=True)
    got, said = [], logging.handlers.BufferingHandler(capacity=100)  # the export's CLI set automodel's handlers
    logging.getLogger("automodel").addHandler(said)
    try:
        with open(gguf.lock_file(folder), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # this process is making the copy
            waiter = threading.Thread(target=lambda: got.append(gguf.dequantised_folder(str(tmp_path),
                                                                                        gguf_file.name)))
            waiter.start()
            waiter.join(timeout=2)
            assert waiter.is_alive(), "the second loader did not wait for the lock"
            gguf.publish(folder, lambda partial: gguf.write_dequantised(gguf_file, partial, "float32"))
        waiter.join(timeout=60)
    finally:
        logging.getLogger("automodel").removeHandler(said)
    assert got == [str(folder)]
    messages = [record.getMessage() for record in said.buffer]
    assert any("reading its dequantised copy" in m for m in messages), messages
    assert not any("dequantising it once" in m for m in messages), messages

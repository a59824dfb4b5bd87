"""benchmarks/peers.py stays runnable: its --quick smoke run for automodel alone (no peers needed)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from automodel.config.precision import native_bf16
from tests.conftest import ASSETS, REPO_ROOT


def test_peers_quick_runs_automodel_and_reports_the_work(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), AUTOMODEL_ASSETS=str(ASSETS),
               AUTOMODEL_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "peers.py"), "--quick", "--threads", "1",
                           "--scenarios", "stories-sft", "--contenders", "automodel,automodel:padded",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "same rows for every contender: yes" in done.stdout
    results = json.loads(out.read_text())["stories-sft"]
    default, padded = results["automodel"], results["automodel:padded"]
    assert default["steps"] == padded["steps"] == 2  # 16 rows, global batch 8
    assert default["real_tokens"] == padded["real_tokens"] > default["label_tokens"] > 0
    assert default["padding"] == 0 < padded["padding"] < 1  # the defaults' batches are padding-free
    # and train the same: in the default precision (bf16 on a CPU that has it) the padded batches' other matmul
    # shapes round differently, by about bf16's unit roundoff 2^-8; in fp32 they agree to 1e-5.
    assert default["last4_loss"] == pytest.approx(padded["last4_loss"], rel=2 ** -8)
    assert all(math.isfinite(r["last4_loss"]) and r["tokens_per_s"] > 0 for r in results.values())
    # the limit is the machine's native matmul rate: bf16's where the CPU computes it, fp32's elsewhere
    native = "bf16" if native_bf16(torch.device("cpu"))[0] else "fp32"
    assert f"{native} matmul limit at the model's shapes" in done.stdout and f"of {native} limit" in done.stdout
    assert all(r["limit_dtype"] == native and r["limit_share"] > 0 for r in results.values())


def test_gpu_script_cpu_parts_build_a_loadable_llama3_model_folder(tmp_path):
    """benchmarks/gpu_peers.py's model folder (shrunk) loads through automodel with the real Llama 3 tokenizer."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import gpu_peers
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    from automodel.models import load_causal_lm, load_tokenizer

    folder = gpu_peers.make_model_folder(tmp_path / "m", device="cpu", hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=32)
    tokenizer = load_tokenizer(str(folder))
    assert len(tokenizer) == 128256 and tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer("Hello world")["input_ids"] == [128000, 9906, 1917]  # Llama 3's ids: BOS, "Hello", " world"
    model = load_causal_lm(str(folder), dtype="bfloat16")
    assert model.config.rope_scaling["rope_type"] == "llama3" and model.config.tie_word_embeddings
    assert gpu_peers.parameter_count(folder) == sum(p.numel() for p in model.parameters())
    assert gpu_peers.model_flops(10, 2, 4, 3, 25) == 6 * 10 * 3 + 6 * 2 * 4 * 25

"""Teacher sources of the kd recipe beyond a safetensors folder: the real SmolLM2-135M-Instruct read from its
publisher's Q4_1 GGUF file (the README main job's base model) teaching a tiny student that shares its tokenizer.
The GGUF file is dequantised into the cache ($AUTOMODEL_CACHE/gguf) on a machine's first load, as in
tests/test_main_job.py, which shares that copy. (The teacher under tensor parallelism: tests/test_kd.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from automodel.cli.main import main
from automodel.models import gguf, load_tokenizer
from tests.conftest import ASSETS
from tests.test_kd import kd_config, records

pytestmark = pytest.mark.slow

SMOL = ASSETS / "models" / "SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_PARAMETERS = "134,515,008"  # tied embedding and head counted once


def tiny_smollm2_student(folder) -> str:
    """SmolLM2's config shrunk to 2 layers of width 64 (its vocabulary, token ids and RoPE kept), randomly
    initialised, saved with SmolLM2's tokenizer (read from the GGUF file): 3.2M parameters, mostly the embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    smollm2 = gguf.tokenizer_folder(str(SMOL), SMOL_FILE)  # the file's config and tokenizer (a cached folder)
    config = AutoConfig.from_pretrained(smollm2)
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=512))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer(smollm2).save_pretrained(folder)
    return str(folder)


def run_kd(tmp_path, capsys, cfg) -> str:
    """`automodel kd llm` on `cfg`, rows cut to 64 tokens (a 135M teacher on 2 cores); its stdout."""
    cfg["dataset"]["seq_length"] = 64
    if "validation_dataset" in cfg:
        cfg["validation_dataset"]["seq_length"] = 64
    cfg["logging"]["plot"] = False
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["kd", "llm", "-c", str(path)]) == 0
    return capsys.readouterr().out


def test_a_gguf_teacher_teaches_a_tiny_student_with_its_vocabulary(tmp_path, capsys):
    cfg = kd_config(tmp_path, peft=False, max_steps=2)
    cfg["model"]["pretrained_model_name_or_path"] = tiny_smollm2_student(tmp_path / "student")
    cfg["teacher_model"] = {"pretrained_model_name_or_path": str(SMOL), "gguf_file": SMOL_FILE}
    out = run_kd(tmp_path, capsys, cfg)
    # read from the file (its dequantised copy in the cache: made now on a cold cache, else reused)
    assert f"GGUF {SMOL_FILE}: reading its dequantised copy" in out or f"{SMOL / SMOL_FILE}: dequantising" in out
    # built like any safetensors folder: on the meta device, then each process reads its shard of the copy
    assert "each process reads its shard of " in out and f"/gguf/{SMOL_FILE.removesuffix('.gguf')}-" in out
    assert f"  teacher     {SMOL / SMOL_FILE} (frozen, {SMOL_PARAMETERS} parameters, held whole" in out
    steps = records(tmp_path / "ckpt", "train")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert all(math.isfinite(r[key]) for key in ("loss", "ce_loss", "kd_loss", "grad_norm"))
        # a random student is far from a trained teacher: both terms large, the loss their mean (kd_ratio 0.5)
        assert r["kd_loss"] > 1.0 and r["ce_loss"] > 1.0
        assert r["loss"] == pytest.approx(0.5 * (r["ce_loss"] + r["kd_loss"]), rel=1e-5)
    assert records(tmp_path / "ckpt", "validation_kd")[0]["val_kd_loss"] > 1.0


def test_a_gguf_teacher_identical_to_its_lora_student_gives_zero_kd(tmp_path, capsys):
    """Student and teacher both read from the GGUF file (the student with LoRA, its adapters starting at zero):
    the first step's KD term is exactly 0."""
    cfg = kd_config(tmp_path, peft=True, max_steps=1)
    source = {"pretrained_model_name_or_path": str(SMOL), "gguf_file": SMOL_FILE}
    cfg["model"] = {**source, "dtype": "float32"}
    cfg["teacher_model"] = dict(source)
    cfg["step_scheduler"].update(global_batch_size=2, local_batch_size=2, val_every_steps=None)
    del cfg["validation_dataset"]
    run_kd(tmp_path, capsys, cfg)
    (step,) = records(tmp_path / "ckpt", "train")
    assert step["kd_loss"] == 0.0 and step["ce_loss"] > 0.0
    assert step["loss"] == pytest.approx(0.5 * step["ce_loss"], rel=1e-6)

"""Fine-tuning learns the task: the README's main job (examples/llm_finetune/smollm2_135m_squad_peft.yaml, a short
LoRA run of the real SmolLM2-135M-Instruct on SQuAD) answers held-out dev questions clearly better than the base
model it started from (the same questions, the same greedy decoding). The run is the example file itself, shortened
to stay cheap: fewer steps of fewer rows, and a dozen of its dev questions (still one from each of 12 articles),
scored before the first step too (the example itself leaves that out: see its comment); its checkpoint then goes
through `automodel merge-lora`.

The margin is what a working fine-tune clears easily and a broken one (no learning, wrong labels, a prompt that
generation does not share with training, an adapter that never stops) does not; it is not a golden number.
The GGUF file is dequantised into the cache ($AUTOMODEL_CACHE/gguf) on a machine's first load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from automodel.cli.main import main
from automodel.config import load_config
from automodel.inference.sources import resolve_source
from automodel.models.gguf import dequantised_folder
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import ASSETS, REPO_ROOT

pytestmark = pytest.mark.slow

EXAMPLE = REPO_ROOT / "examples" / "llm_finetune" / "smollm2_135m_squad_peft.yaml"
SMOL = ASSETS / "models" / "SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = 12  # of the example's dev questions: enough for the margin, a small part of the scoring time
STEPS, BATCH = 12, 4  # a fraction of the example's training: it learns the task's form, not yet all of its quality
F1_MARGIN = 15.0  # points of SQuAD F1 (0-100)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The example's run (its checkpoint_dir) and its config, trained once for this module."""
    out = tmp_path_factory.mktemp("main_job")
    cfg = load_config(EXAMPLE, [f"--validation_dataset.limit_dataset_samples={QUESTIONS}",
                                f"--step_scheduler.max_steps={STEPS}", f"--step_scheduler.global_batch_size={BATCH}",
                                f"--step_scheduler.local_batch_size={BATCH}",
                                f"--step_scheduler.val_generate_every_steps={STEPS}",
                                "--step_scheduler.val_generate_at_start=true",
                                f"--checkpoint.checkpoint_dir={out}", "--logging.progress_bar=false",
                                "--logging.plot=false"])
    result = FinetuneRecipe(cfg).run()
    return out, cfg, result


def test_the_main_job_beats_the_base_model_on_held_out_questions(main_job):
    out, cfg, result = main_job
    steps = cfg["step_scheduler"]["max_steps"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r for r in records if r["kind"] == "generation"}
    assert sorted(scores) == [0, steps] and result.steps == steps
    base, tuned = scores[0], scores[steps]
    assert base["total"] == tuned["total"] == QUESTIONS
    print(f"\nSmolLM2-135M on {QUESTIONS} dev questions: base F1 {base['f1']:.1f} EM {base['exact_match']:.1f}, "
          f"after {steps} LoRA steps F1 {tuned['f1']:.1f} EM {tuned['exact_match']:.1f}")
    assert tuned["f1"] > base["f1"] + F1_MARGIN
    assert tuned["ran_to_max_new_tokens"] <= 1, "the adapter did not learn to end its answers with EOS"
    assert result.val_losses[steps] < result.val_losses[0]  # step 0: the base model's validation loss


def test_merge_lora_finds_the_gguf_base_and_adds_the_adapter(main_job, tmp_path):
    out, cfg, _ = main_job
    source = resolve_source(str(out))  # LATEST -> step folder -> its config.yaml records the GGUF base
    assert Path(source.base).resolve() == SMOL.resolve() and source.gguf_file == SMOL_FILE
    assert main(["merge-lora", str(out), "--output", str(tmp_path / "merged")]) == 0

    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(Path(dequantised_folder(str(SMOL), SMOL_FILE)) / "model.safetensors")
    adapter = load_file(source.adapter / "adapter_model.safetensors")
    adapter_config = json.loads((source.adapter / "adapter_config.json").read_text())
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    assert set(merged) == set(base)
    adapted = 0
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        lora_a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if lora_a is None:
            assert torch.equal(merged[name], weight), name
            continue
        lora_b = adapter[f"base_model.model.{module}.lora_B.weight"]
        assert lora_b.abs().max() > 0, name  # trained: the adapter really changes this layer
        torch.testing.assert_close(merged[name], weight + scale * lora_b @ lora_a, rtol=0, atol=1e-5)
        adapted += 1
    assert adapted == 7 * cfg_layers(base)  # all-linear: q, k, v, o, gate, up, down of every layer


def cfg_layers(state: dict) -> int:
    return len({name.split(".")[2] for name in state if name.startswith("model.layers.")})

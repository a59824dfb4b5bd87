"""The README's main job (examples/llm_finetune/smollm2_135m_squad_peft.yaml, a short LoRA run of the real
SmolLM2-135M-Instruct on SQuAD) trained once, then everything a user does with it checked on that one run.

It learns the task: it answers held-out dev questions clearly better than the base model it started from (the
same questions, the same greedy decoding). The run is the example file itself, shortened to stay cheap: fewer steps
of fewer rows, and a dozen of its dev questions (still one from each of 12 articles), scored before the first step
too (the example itself leaves that out: see its comment). The margin is what a working fine-tune clears easily and
a broken one (no learning, wrong labels, a prompt that generation does not share with training, an adapter that
never stops) does not; it is not a golden number.

Its checkpoint then goes through `automodel merge-lora`, and through `automodel export --format gguf` (the LoRA
merged on export), checked by llama.cpp (.venv-llamacpp): at F32, llama.cpp's greedy tokens and logits against
`automodel generate`'s on chat prompts (tolerance derived in tests/test_gguf_export.py), llama.cpp's own
chat-template handling answers, and transformers' GGUF reader gives the merged weights back exactly; at Q8_0, the
held-out SQuAD F1 in llama.cpp within one question's worth of the F32 file's on GGUF_QUESTIONS questions (the
issue's figure, on 200 questions, is benchmarks/gguf_squad.py's, in docs/guides/llm/deploy.md; llama.cpp answering
SQuAD prompts on one thread is most of that test's time, so it keeps few).

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
from benchmarks.gguf_squad import held_out_questions, squad_scores_in_llamacpp
from tests.conftest import ASSETS, REPO_ROOT
from tests.test_gguf_export import NEW_TOKENS, check_against_llamacpp, check_read_back, export, run_llamacpp

pytestmark = pytest.mark.slow

EXAMPLE = REPO_ROOT / "examples" / "llm_finetune" / "smollm2_135m_squad_peft.yaml"
SMOL = ASSETS / "models" / "SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = 12  # of the example's dev questions: enough for the margin, a small part of the scoring time
STEPS, BATCH = 12, 4  # a fraction of the example's training: it learns the task's form, not yet all of its quality
F1_MARGIN = 15.0  # points of SQuAD F1 (0-100)
GGUF_QUESTIONS = 8
# The bound, 2 F1 points, is for 200+ questions (benchmarks/gguf_squad.py); on 8 one question moves F1 by
# up to 100/8 = 12.5 points, so here Q8_0 may change at most one question's answer's worth.
GGUF_F1_POINTS = 100 / GGUF_QUESTIONS


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


@pytest.fixture(scope="module")
def f32_export(main_job, tmp_path_factory):
    """The main job's checkpoint exported as an F32 GGUF file (LoRA merged)."""
    out, _, _ = main_job
    return export(out, tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf")


def test_llamacpp_runs_the_merged_fine_tune_like_automodel_generate(main_job, f32_export, tmp_path,
                                                                     llamacpp_python):
    from automodel.inference.generate import GenerationSettings, Generator

    out, _, _ = main_job
    generator = Generator.load(str(out), dtype="float32", device="cpu")
    generator.model = generator.model.merge_and_unload()  # the same weights as the file, in torch
    chat = [generator.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                    add_generation_prompt=True)
            for question in ("What is the capital of France?", "Name a large animal that lives in the sea.")]
    check_against_llamacpp(generator, f32_export, llamacpp_python, tmp_path, chat)
    check_read_back(generator.model, f32_export)
    # llama.cpp applies the chat template it read from the file: the same prompt as ours, so the same answer
    result, _ = run_llamacpp(llamacpp_python, f32_export, tmp_path, [], answers=["What is the capital of France?"],
                             logits=False)
    ours = generator.generate(chat[:1], GenerationSettings(max_new_tokens=NEW_TOKENS))
    assert result["answers"][0].strip() == ours[0].strip()


def test_q8_0_keeps_the_held_out_squad_f1(main_job, f32_export, tmp_path, llamacpp_python):
    out, _, _ = main_job
    q8_file = export(out, tmp_path / "smollm2-q8_0.gguf", "q8_0")
    assert q8_file.stat().st_size < 0.3 * f32_export.stat().st_size  # 8.5 bits a weight instead of 32
    questions, tokenizer = held_out_questions(out, GGUF_QUESTIONS)
    f32 = squad_scores_in_llamacpp(llamacpp_python, f32_export, questions, tokenizer, tmp_path)
    q8 = squad_scores_in_llamacpp(llamacpp_python, q8_file, questions, tokenizer, tmp_path)
    print(f"\nllama.cpp, {GGUF_QUESTIONS} held-out SQuAD questions: F32 F1 {f32['f1']:.1f}, Q8_0 F1 {q8['f1']:.1f}")
    assert f32["f1"] > 20.0  # the fine-tune answers questions: the comparison is not of two empty outputs
    assert abs(q8["f1"] - f32["f1"]) <= GGUF_F1_POINTS

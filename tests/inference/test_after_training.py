"""generate / eval squad / merge-lora / serve on real checkpoints of short real fine-tunes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from automodel.cli.main import main
from automodel.data.squad import DEFAULT_PROMPT_TEMPLATE
from automodel.inference.generate import GenerationSettings, Generator
from automodel.inference.squad_metrics import squad_scores
from tests.conftest import SQUAD_DEV, STORIES

pytestmark = pytest.mark.slow


def read_json(path):
    return json.loads(path.read_text())


def printed(out: str, prefix: str) -> str:
    """The line of the command's stdout that starts with `prefix` (log lines share stdout)."""
    lines = [line for line in out.splitlines() if line.strip().startswith(prefix)]
    assert len(lines) == 1, out
    return lines[0].strip()


def test_eval_squad_base_vs_lora_on_the_same_50_questions(lora_run, tmp_path, capsys):
    base_dir, lora_dir = tmp_path / "base", lora_run / "step_20" / "squad_eval"
    # The base model gets the run's prompt settings explicitly; the checkpoint reads them from its config.yaml.
    assert main(["eval", "squad", str(STORIES), "--dataset", str(SQUAD_DEV), "--seq-length", "256", "--limit", "50",
                 "--output-dir", str(base_dir)]) == 0
    base_summary = printed(capsys.readouterr().out, "SQuAD v")
    assert main(["eval", "squad", str(lora_run), "--limit", "50"]) == 0
    lora_summary = printed(capsys.readouterr().out, "SQuAD v")
    with capsys.disabled():
        print(f"\nbase stories260K : {base_summary}\nLoRA step 20     : {lora_summary}")

    base_pred, lora_pred = read_json(base_dir / "predictions.json"), read_json(lora_dir / "predictions.json")
    assert len(base_pred) == 50 and base_pred.keys() == lora_pred.keys()
    assert base_pred != lora_pred, "the adapter did not change a single answer"
    dev = json.loads(SQUAD_DEV.read_text())
    gold = {q["id"]: [a["text"] for a in q["answers"]] for art in dev["data"] for p in art["paragraphs"]
            for q in p["qas"] if q["id"] in base_pred}
    for folder, predictions, summary in ((base_dir, base_pred, base_summary), (lora_dir, lora_pred, lora_summary)):
        report = read_json(folder / "scores.json")
        expected = squad_scores(predictions, gold)
        assert report["exact_match"] == pytest.approx(expected["exact_match"])
        assert report["f1"] == pytest.approx(expected["f1"]) and report["total"] == 50
        unstopped = report["ran_to_max_new_tokens"]
        assert 0 <= unstopped <= 50
        cut_away = report["answer_cut_away"]
        assert 0 <= cut_away < 50
        assert summary == f"SQuAD v1.1 | 50 questions | exact match {expected['exact_match']:.2f} | " \
                          f"F1 {expected['f1']:.2f} | {unstopped} ran to max_new_tokens (32) without EOS | " \
                          f"{cut_away} with every answer cut out of the context (seq_length 256)"
    assert read_json(lora_dir / "scores.json")["prompt_template"] == DEFAULT_PROMPT_TEMPLATE


def test_eval_prompts_are_the_training_prompts(lora_run):
    """A trained prompt changed by one character would mean evaluating a different task; eval squad and the run's
    validation set both cut held-out contexts at their end (the recipe's build, data/loaders.py)."""
    from automodel.config import TargetPolicy
    from automodel.config.loader import load_yaml
    from automodel.data.loaders import build_dataset
    from automodel.inference.squad_eval import SquadEvalOptions, load_questions, resolve_options

    generator = Generator.load(str(lora_run))
    config = load_yaml(lora_run / "config.yaml")
    trained = build_dataset(config, "validation_dataset", TargetPolicy(), generator.tokenizer).examples
    args = resolve_options(SquadEvalOptions(), generator.source.train_config, 512, 32)
    evaluated = load_questions(generator.tokenizer, args)
    assert [q["prompt"] for q in evaluated] == [q["prompt"] for q in trained]


def test_generate_batched_equals_one_by_one_and_stops_at_eos(lora_run):
    generator = Generator.load(str(lora_run))
    prompts = ["Once upon a time", "Context: Tom had a red ball. Question: What did Tom have? Answer: ", "Lily"]
    settings = GenerationSettings(max_new_tokens=24, batch_size=3)
    batched = generator.generate(prompts, settings)
    single = [generator.generate([p], settings)[0] for p in prompts]
    assert batched == single
    ids = generator.tokenizer(prompts[1], return_tensors="pt")
    raw = generator.model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, ids.input_ids.shape[1]:]
    eos = generator.tokenizer.eos_token_id
    if eos in raw.tolist():  # the completion ends where EOS came, without it
        end = raw.tolist().index(eos)
        assert batched[1] == generator.tokenizer.decode(raw[:end], skip_special_tokens=True).strip()


def test_generate_cli_streams_one_prompt_and_writes_jsonl(lora_run, tmp_path, capsys):
    assert main(["generate", str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "12"]) == 0
    assert ", there was a little girl" in capsys.readouterr().out  # stories260K's documented greedy story
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1, "name": "Lily"}\n{"id": 2, "name": "Tom"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(lora_run), "--prompts-file", str(rows), "--template", "Once upon a time, {name}",
                 "--output", str(out), "--max-new-tokens", "8"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [1, 2] and records[0]["prompt"] == "Once upon a time, Lily"
    assert all(isinstance(r["completion"], str) and r["completion"] for r in records)


def test_merge_lora_matches_base_with_adapter(lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge-lora", str(lora_run), "--output", str(out)]) == 0
    assert printed(capsys.readouterr().out, "merged model written to") == f"merged model written to {out}"
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(STORIES).get_vocab()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(STORIES),
                                             lora_run / "step_20" / "model").eval()
    ids = AutoTokenizer.from_pretrained(out)(["Once upon a time there was", "Context: a b c"], return_tensors="pt",
                                             padding=True)
    with torch.no_grad():
        want = with_adapter(**ids).logits
        # fp32: merging reassociates W x + s B A x into (W + s B A) x, so equal to rounding: 1e-5 of the largest
        # logit (the matmuls' summation order also changes with the number of threads).
        scale = want.abs().max().item()
        torch.testing.assert_close(merged(**ids).logits, want, rtol=1e-5, atol=1e-5 * scale)


def test_merge_keeps_bfloat16(fresh_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base_bf16"
    AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.bfloat16).save_pretrained(base)
    out = tmp_path / "merged"
    assert main(["merge-lora", str(base), "--adapter", str(fresh_adapter), "--output", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    assert main(["merge-lora", str(base), "--adapter", str(fresh_adapter), "--output", str(out)]) == 2


def test_serve_merged_and_full_fine_tune(lora_run, sft_run, tmp_path, capsys):
    assert main(["serve", str(lora_run), "--output", str(tmp_path / "m"), "--merge", "--name", "squad"]) == 0
    out = capsys.readouterr().out
    command = out.split("serve it with:\n", 1)[1].splitlines()[0].split(" -m vllm.entrypoints.openai.api_server ")[1]
    assert command.startswith(f"--model {(tmp_path / 'm').resolve()} --served-model-name squad --host 127.0.0.1 "
                              "--port 8000")
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer_config.json").is_file()
    assert main(["serve", str(sft_run / "step_2"), "--output", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "config.json").is_file() and (tmp_path / "s" / "generation_config.json").is_file()

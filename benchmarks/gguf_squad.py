"""The SmolLM2 main job's fine-tune as GGUF, answered by llama.cpp: does Q8_0 keep its SQuAD F1? One table.

The README's main job (examples/llm_finetune/smollm2_135m_squad_peft.yaml, a LoRA run on SQuAD v1.1) is trained
(or an existing checkpoint_dir is given), exported with `automodel export --format gguf` at F32 and at Q8_0 (the
adapter merged into its base), and both files answer the same held-out dev questions (SQuAD v1.1 dev part a: other
articles than the training questions) in llama.cpp (llama-cpp-python, .venv-llamacpp: `bash
scripts/setup_llamacpp.sh`), greedy, from the same prompt token ids (the run's template). Exact match and F1 are
automodel's SQuAD scoring. Wall time is llama.cpp's answering of all questions on one thread.

    python benchmarks/gguf_squad.py                          # train, export, 200 questions (CPU: ~20 minutes)
    python benchmarks/gguf_squad.py --checkpoint-dir DIR --questions 200   # DIR: trained there unless it holds a run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", REPO.parent / "shared" / "assets")).resolve()
EXAMPLE = REPO / "examples" / "llm_finetune" / "smollm2_135m_squad_peft.yaml"
LLAMACPP_PYTHON = REPO / ".venv-llamacpp" / "bin" / "python"
MAX_NEW_TOKENS = 32


def train(checkpoint_dir: Path, steps: int | None) -> None:
    overrides = [f"--checkpoint.checkpoint_dir={checkpoint_dir}", "--step_scheduler.val_generate_at_start=false",
                 "--logging.progress_bar=false", "--logging.plot=false"]
    if steps:
        overrides += [f"--step_scheduler.max_steps={steps}", f"--step_scheduler.val_generate_every_steps={steps}"]
    subprocess.run([sys.executable, "-m", "automodel.cli.main", "finetune", "llm", "-c", str(EXAMPLE), *overrides],
                   cwd=REPO, check=True)


def export(checkpoint_dir: Path, output: Path, type_name: str) -> Path:
    subprocess.run([sys.executable, "-m", "automodel.cli.main", "export", str(checkpoint_dir), "--format", "gguf",
                    "--type", type_name, "--output", str(output)], cwd=REPO, check=True)
    return output


def held_out_questions(checkpoint_dir: Path, count: int):
    """The run's validation questions (its template and prompt length), the first `count`, with our tokenizer."""
    from automodel.config.redact import read_run_config
    from automodel.inference.generate import load_model_and_tokenizer
    from automodel.inference.sources import resolve_source
    from automodel.inference.squad_eval import load_questions

    source = resolve_source(str(checkpoint_dir))
    config = read_run_config(source.step_dir / "config.yaml")["validation_dataset"]
    _, tokenizer = load_model_and_tokenizer(source, "float32", device="cpu")
    builder = {"dataset_name": config["dataset_name"], "split": config["split"], "seq_length": config["seq_length"],
               "limit_dataset_samples": count, "prompt_template": config["prompt_template"],
               "spread_over_articles": config.get("spread_over_articles", False)}
    return load_questions(tokenizer, builder), tokenizer


def answer_in_llamacpp(python: Path, gguf_file: Path, prompts: list[list[int]], work: Path,
                       max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[list[list[int]], float]:
    """llama.cpp's greedy completions of the prompt token ids, and the seconds it took."""
    request = work / "request.json"
    request.write_text(json.dumps({"model": str(gguf_file), "prompts": prompts, "max_new_tokens": max_new_tokens}))
    start = time.perf_counter()
    subprocess.run([str(python), str(REPO / "scripts" / "llamacpp_run.py"), str(request), str(work)], check=True)
    return json.loads((work / "result.json").read_text())["greedy"], time.perf_counter() - start


def squad_scores_in_llamacpp(python: Path, gguf_file: Path, questions, tokenizer, work: Path) -> dict:
    """Exact match and F1 of llama.cpp's answers, scored as `automodel eval squad` scores (first line, stripped)."""
    from automodel.inference.squad_metrics import squad_scores

    prompts = [tokenizer(q["prompt"])["input_ids"] for q in questions]
    completions, seconds = answer_in_llamacpp(python, gguf_file, prompts, work)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    predictions = {q["id"]: (t.splitlines()[0].strip() if t.strip() else "") for q, t in zip(questions, texts)}
    scores = squad_scores(predictions, {q["id"]: q["answers"] for q in questions})
    return {**scores, "seconds": seconds, "size_mb": gguf_file.stat().st_size / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="a finished run of the main job, or where to train one (default: a temporary folder)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--steps", type=int, help="train this many steps instead of the example's")
    parser.add_argument("--types", default="F32,Q8_0")
    args = parser.parse_args()
    if not LLAMACPP_PYTHON.is_file():
        subprocess.run(["bash", "scripts/setup_llamacpp.sh"], cwd=REPO, check=True)
    with tempfile.TemporaryDirectory(prefix="gguf_squad-") as tmp:
        work = Path(tmp)
        checkpoint_dir = args.checkpoint_dir or work / "run"
        if not (checkpoint_dir / "LATEST").is_file():
            train(checkpoint_dir, args.steps)
        questions, tokenizer = held_out_questions(checkpoint_dir, args.questions)
        rows = {}
        for type_name in args.types.split(","):
            gguf_file = export(checkpoint_dir, work / f"smollm2-squad-{type_name.lower()}.gguf", type_name)
            rows[type_name] = squad_scores_in_llamacpp(LLAMACPP_PYTHON, gguf_file, questions, tokenizer, work)
    print(f"\nSmolLM2-135M main job (LoRA, merged) as GGUF in llama.cpp, {len(questions)} held-out SQuAD v1.1 "
          "dev questions, greedy:")
    print(f"{'type':<6} {'file MB':>8} {'EM':>6} {'F1':>6} {'answer s':>9}")
    for type_name, row in rows.items():
        print(f"{type_name:<6} {row['size_mb']:>8.1f} {row['exact_match']:>6.1f} {row['f1']:>6.1f} "
              f"{row['seconds']:>9.1f}")
    names = list(rows)
    if len(names) == 2:
        print(f"F1 difference {names[1]} - {names[0]}: {rows[names[1]]['f1'] - rows[names[0]]['f1']:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())

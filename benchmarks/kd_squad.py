"""Knowledge distillation against cross-entropy only, on real SQuAD v1.1: the table in docs/guides/llm/kd.md.

    python benchmarks/kd_squad.py [--workdir checkpoints/kd_squad] [--steps 50] [--limit 200]

1. Teacher: the README's main job (examples/llm_finetune/smollm2_135m_squad_peft.yaml, its scoring by generation
   turned off), its LoRA adapter merged into the base (`automodel merge-lora`).
2. Student: the teacher's weights with every other decoder layer kept (scripts/derive_student.py).
3. Two runs of examples/llm_kd/smollm2_squad_kd.yaml, identical but for `kd_ratio`: 0.5 (KD) and 0 (cross-entropy
   only; the teacher still runs, so both report the same held-out KL to it).
4. Every model answers the same held-out dev questions by greedy generation (`automodel eval squad`).
Each stage is skipped when its output is already there, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAIN_JOB = "examples/llm_finetune/smollm2_135m_squad_peft.yaml"
KD_CONFIG = "examples/llm_kd/smollm2_squad_kd.yaml"
RUNS = {"KD (kd_ratio 0.5)": ("kd", 0.5), "cross-entropy only (kd_ratio 0)": ("ce", 0.0)}


def automodel(*args: str) -> None:
    command = [sys.executable, "-m", "automodel", *args]
    print("$ automodel", " ".join(args), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def last_step(run_dir: Path) -> Path:
    return run_dir / (run_dir / "LATEST").read_text().strip()


def make_teacher(workdir: Path) -> Path:
    teacher = workdir / "teacher"
    if (teacher / "config.json").is_file():
        return teacher
    lora_run = workdir / "teacher_lora"
    if not (lora_run / "LATEST").is_file():
        automodel("finetune", "llm", "-c", MAIN_JOB, "--logging.progress_bar", "false",
                  "--step_scheduler.val_generate_at_start", "false",
                  "--step_scheduler.val_generate_every_steps", "null", f"--checkpoint.checkpoint_dir={lora_run}")
    automodel("merge-lora", str(lora_run), "--output", str(teacher))
    return teacher


def make_student(workdir: Path, teacher: Path) -> Path:
    student = workdir / "student"
    if not (student / "config.json").is_file():
        subprocess.run([sys.executable, "scripts/derive_student.py", str(teacher), "--output", str(student),
                        "--every", "2"], cwd=REPO, check=True)
    return student


def train(workdir: Path, name: str, kd_ratio: float, steps: int, limit: int) -> Path:
    run_dir = workdir / name
    if not ((run_dir / "LATEST").is_file() and last_step(run_dir).name == f"step_{steps}"):
        automodel("kd", "llm", "-c", KD_CONFIG, "--logging.progress_bar", "false", f"--kd_ratio={kd_ratio}",
                  f"--model.pretrained_model_name_or_path={workdir / 'student'}",
                  f"--teacher_model.pretrained_model_name_or_path={workdir / 'teacher'}",
                  f"--step_scheduler.max_steps={steps}", f"--step_scheduler.val_every_steps={steps}",
                  f"--validation_dataset.limit_dataset_samples={limit}", f"--checkpoint.checkpoint_dir={run_dir}")
    return run_dir


def squad_scores(model: Path, out: Path, limit: int, *extra: str) -> dict:
    if not (out / "scores.json").is_file():
        automodel("eval", "squad", str(model), "--limit", str(limit), "--output-dir", str(out), *extra)
    return json.loads((out / "scores.json").read_text())


def held_out_kl(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == "validation_kd"][-1]["val_kd_loss"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "checkpoints" / "kd_squad")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--limit", type=int, default=200, help="held-out dev questions")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    teacher = make_teacher(workdir)
    make_student(workdir, teacher)
    rows = []
    for label, (name, ratio) in RUNS.items():
        run_dir = train(workdir, name, ratio, args.steps, args.limit)
        scores = squad_scores(last_step(run_dir), workdir / f"eval_{name}", args.limit)
        rows.append((label, scores, f"{held_out_kl(run_dir):.4f}"))
    # The teacher's run validated on the same dev file with 384-token prompts: cut them as the student's runs do.
    scores = squad_scores(last_step(workdir / "teacher_lora"), workdir / "eval_teacher", args.limit,
                          "--seq-length", "160")
    rows.append(("teacher (30 layers, LoRA merged)", scores, "0"))
    print(f"\nSQuAD v1.1 dev, {args.limit} held-out questions, greedy generation; students: {args.steps} steps\n")
    print("| model | exact match | F1 | KL to the teacher (per answer token) |\n|---|---|---|---|")
    for label, scores, kl in rows:
        print(f"| {label} | {scores['exact_match']:.1f} | {scores['f1']:.1f} | {kl} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Knowledge distillation against cross-entropy only, on real SQuAD v1.1: the table in docs/guides/llm/kd.md.

    python benchmarks/kd_squad.py [--workdir checkpoints/kd_squad] [--steps 20] [--limit 200] [--kl-limit 64]

1. Teacher: the README's main job (examples/llm_finetune/smollm2_135m_squad_peft.yaml, its scoring by generation
   turned off), its LoRA adapter merged into the base (`automodel merge-lora`).
2. Student: the teacher's weights with every other decoder layer kept (scripts/derive_student.py).
3. Two runs of examples/llm_kd/smollm2_squad_kd.yaml, identical but for `kd_ratio`: 0.5 (KD) and 0 (cross-entropy
   only; the teacher still runs, so both report the same held-out KL to it).
4. Every model answers the same held-out dev questions by greedy generation (`automodel eval squad`).
Each stage is skipped when its output is already there, so an interrupted run continues; independent stages (the two
runs, the teacher's scoring) run side by side.
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


def automodel(*args: str) -> subprocess.Popen:
    """Start an automodel command; its output goes to this process's stdout."""
    print("$ automodel", " ".join(args), flush=True)
    return subprocess.Popen([sys.executable, "-m", "automodel", *args], cwd=REPO)


def wait(*procs: subprocess.Popen | None) -> None:
    """Wait for every started command (None: a stage whose output was already there); fail on any failure."""
    for proc in procs:
        if proc is not None and proc.wait() != 0:
            raise SystemExit(f"error: {' '.join(map(str, proc.args[2:]))} failed with exit code {proc.returncode}")


def last_step(run_dir: Path) -> Path:
    return run_dir / (run_dir / "LATEST").read_text().strip()


def make_teacher(workdir: Path) -> Path:
    teacher = workdir / "teacher"
    if (teacher / "config.json").is_file():
        return teacher
    lora_run = workdir / "teacher_lora"
    if not (lora_run / "LATEST").is_file():
        wait(automodel("finetune", "llm", "-c", MAIN_JOB, "--logging.progress_bar", "false",
                       "--step_scheduler.val_generate_at_start", "false",
                       "--step_scheduler.val_generate_every_steps", "null", f"--checkpoint.checkpoint_dir={lora_run}"))
    wait(automodel("merge-lora", str(lora_run), "--output", str(teacher)))
    return teacher


def make_student(workdir: Path, teacher: Path) -> Path:
    student = workdir / "student"
    if not (student / "config.json").is_file():
        subprocess.run([sys.executable, "scripts/derive_student.py", str(teacher), "--output", str(student),
                        "--every", "2"], cwd=REPO, check=True)
    return student


def train(workdir: Path, name: str, kd_ratio: float, steps: int, limit: int) -> subprocess.Popen | None:
    run_dir = workdir / name
    if (run_dir / "LATEST").is_file() and last_step(run_dir).name == f"step_{steps}":
        return None
    return automodel("kd", "llm", "-c", KD_CONFIG, "--logging.progress_bar", "false", f"--kd_ratio={kd_ratio}",
                     f"--model.pretrained_model_name_or_path={workdir / 'student'}",
                     f"--teacher_model.pretrained_model_name_or_path={workdir / 'teacher'}",
                     f"--step_scheduler.max_steps={steps}", f"--step_scheduler.val_every_steps={steps}",
                     f"--validation_dataset.limit_dataset_samples={limit}", f"--checkpoint.checkpoint_dir={run_dir}")


def squad_eval(model: Path, out: Path, limit: int, *extra: str) -> subprocess.Popen | None:
    if (out / "scores.json").is_file():
        return None
    return automodel("eval", "squad", str(model), "--limit", str(limit), "--output-dir", str(out), *extra)


def scores(out: Path) -> dict:
    return json.loads((out / "scores.json").read_text())


def held_out_kl(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == "validation_kd"][-1]["val_kd_loss"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "checkpoints" / "kd_squad")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--limit", type=int, default=200, help="held-out dev questions answered by generation")
    parser.add_argument("--kl-limit", type=int, default=64, help="the first N of them give the KL to the teacher "
                        "(the runs' validation set)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    teacher = make_teacher(workdir)
    make_student(workdir, teacher)
    # The runs and evaluations are independent: they run side by side. The teacher's run validated on the same dev
    # file with 384-token prompts: it is scored on them cut as the students' runs cut them.
    wait(*(train(workdir, name, ratio, args.steps, args.kl_limit) for name, ratio in RUNS.values()),
         squad_eval(last_step(workdir / "teacher_lora"), workdir / "eval_teacher", args.limit, "--seq-length", "160"))
    wait(*(squad_eval(last_step(workdir / name), workdir / f"eval_{name}", args.limit) for name, _ in RUNS.values()))
    rows = [(label, scores(workdir / f"eval_{name}"), f"{held_out_kl(workdir / name):.4f}")
            for label, (name, _) in RUNS.items()]
    rows.append(("teacher (30 layers, LoRA merged)", scores(workdir / "eval_teacher"), "0"))
    print(f"\nSQuAD v1.1 dev: exact match and F1 by greedy generation on {args.limit} held-out questions, KL to the "
          f"teacher on the first {args.kl_limit}; students: {args.steps} steps\n")
    print("| model | exact match | F1 | KL(teacher ‖ model) per answer token |\n|---|---|---|---|")
    for label, result, kl in rows:
        print(f"| {label} | {result['exact_match']:.1f} | {result['f1']:.1f} | {kl} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

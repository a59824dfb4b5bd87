"""glibc's mmap threshold, per mechanism, on the memory case and the speed cell in one run.

    python benchmarks/host_memory.py [--layers 4] [--speed-steps 4] [--workdir /tmp/host_memory]

Mechanisms (automodel/training/host_memory.py), each in fresh processes:
  fixed-1MiB   the threshold fixed at 1 MiB for the whole run (MALLOC_MMAP_THRESHOLD_=1048576, which is what the
               CLI did before: automodel leaves a threshold set in the environment alone)
  phased       the default: 1 MiB for model load and checkpoint save, 32 MiB for the training steps with
               malloc_trim(0) when they start and after every step
  fixed-32MiB  MALLOC_MMAP_THRESHOLD_=33554432: glibc's ceiling for the whole run, the speed reference
Memory case (`--case`): benchmarks/big_model.py's lora3b (Llama-3.2-3B shape, LoRA on every linear layer) or sft1b
(TinyLlama-1.1B shape, full SFT), 2 FSDP2 processes, 3 steps, then the save, cut to `--layers` layers (every tensor
keeps its real size); per-rank peak RSS after setup,
during training and at the end (the save). Speed cell: the README's main job (SmolLM2-135M LoRA,
examples/llm_finetune/smollm2_135m_squad_peft.yaml) for `--speed-steps` steps in one process, no evaluation or
checkpoint; tokens per wall second and per CPU second of steps 2.. (the first step warms up; on a shared machine
the CPU seconds are the steadier measure), the share of that CPU time spent in the kernel and the minor page
faults per step (/proc/PID/stat). Printed side by side, with ratios to the first mechanism.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.big_model import gb, run_config, train, write_checkpoint  # noqa: E402

MECHANISMS = {"fixed-1MiB": "1048576", "phased": None, "fixed-32MiB": "33554432"}
MAIN_JOB = REPO / "examples" / "llm_finetune" / "smollm2_135m_squad_peft.yaml"


def environment(mechanism: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    if MECHANISMS[mechanism] is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = MECHANISMS[mechanism]
    return env


def memory_case(mechanism: str, case: str, hub: Path, out: Path) -> dict:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environment(mechanism))  # big_model.train starts the CLI with this process's environment
    try:
        return train(run_config(case, hub, out, 3, "meta"), out)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(out, ignore_errors=True)


def cpu_counters(pid: int) -> tuple[float, float, int]:
    """User + system CPU seconds, system seconds and minor page faults of a process so far (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0, 0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick, int(fields[7])


def speed_cell(mechanism: str, steps: int, out: Path) -> dict:
    """Tokens per wall second and per CPU second (user + system: the page faults a threshold causes are system
    time) of steps 2.., the CPU time read from /proc as each step's record appears."""
    command = [sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(MAIN_JOB),
               f"--step_scheduler.max_steps={steps}", "--step_scheduler.log_every_steps=1",
               "--step_scheduler.val_generate_at_start=false", "--step_scheduler.val_generate_every_steps=null",
               "--checkpoint.enabled=false", f"--checkpoint.checkpoint_dir={out}", "--logging.progress_bar=false"]
    env = {**environment(mechanism), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    metrics = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"speed-{mechanism}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    cpu_at_step, done = {}, 0
    try:
        while proc.poll() is None and done < steps:  # what runs after the last step is not measured
            cpu = cpu_counters(proc.pid)
            done = metrics.read_text().count('"kind": "train"') if metrics.is_file() else 0
            cpu_at_step.setdefault(done, cpu)
            time.sleep(0.1)
        if done < steps:
            return {"error": (out.parent / f"speed-{mechanism}.log").read_text().strip().splitlines()[-1]}
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        train_records = [r for r in records if r.get("kind") == "train"][1:]
        tokens = sum(r["tokens"] for r in train_records)
        cpu, system, faults = (b - a for a, b in zip(cpu_at_step[1], cpu_at_step[steps]))
        return {"tokens_per_s": tokens / sum(r["step_s"] for r in train_records), "tokens_per_cpu_s": tokens / cpu,
                "system_share": system / cpu, "faults_per_step": faults / len(train_records),
                "steps": len(train_records)}
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--speed-steps", type=int, default=4)
    parser.add_argument("--mechanisms", nargs="+", choices=list(MECHANISMS), default=list(MECHANISMS))
    parser.add_argument("--case", choices=["lora3b", "sft1b"], default="lora3b", help="the memory case")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--workdir", default="/tmp/host_memory")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    memory, speed = {}, {}
    try:
        params = 0 if args.skip_memory else write_checkpoint(args.case, 1.0, workdir / "hub", args.layers)
        for mechanism in args.mechanisms:
            if not args.skip_speed:
                speed[mechanism] = speed_cell(mechanism, args.speed_steps, workdir / "speed")
                print(f"{mechanism}: speed {speed[mechanism]}", flush=True)
            if not args.skip_memory:
                memory[mechanism] = memory_case(mechanism, args.case, workdir / "hub", workdir / "memory")
                print(f"{mechanism}: memory {memory[mechanism]}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = args.mechanisms[0]
    if memory:
        print(f"\nmemory: {args.case} cut to {args.layers} layers ({params / 1e9:.2f}B parameters, fp32 {gb(4 * params)} GB),"
              " 2 FSDP2 processes, peak RSS GB per rank")
        print(f"{'mechanism':12} {'after setup':>13} {'training':>13} {'end (save)':>13} {'max / ' + base:>17}")
        for mechanism, row in memory.items():
            if "error" in row:
                print(f"{mechanism:12} failed: {row['error'][:100]}")
                continue
            ratio = max(row["ranks"]) / max(memory[base]["ranks"]) if "ranks" in memory[base] else float("nan")
            print(f"{mechanism:12} {' / '.join(gb(v) for v in row['load_ranks']):>13} "
                  f"{' / '.join(gb(v) for v in row['train_ranks']):>13} {' / '.join(gb(v) for v in row['ranks']):>13} "
                  f"{ratio:17.2f}")
    if not speed:
        return
    print(f"\nspeed: the README's main job (SmolLM2-135M LoRA), steps 2-{args.speed_steps}")
    print(f"{'mechanism':12} {'tokens/s':>9} {'/ ' + base:>14} {'tokens/CPU s':>13} {'/ ' + base:>14} "
          f"{'system CPU share':>17} {'page faults/step':>17}")
    for mechanism, row in speed.items():
        if "error" in row:
            print(f"{mechanism:12} failed: {row['error'][:100]}")
            continue
        print(f"{mechanism:12} {row['tokens_per_s']:9.1f} {row['tokens_per_s'] / speed[base]['tokens_per_s']:14.2f} "
              f"{row['tokens_per_cpu_s']:13.1f} {row['tokens_per_cpu_s'] / speed[base]['tokens_per_cpu_s']:14.2f} "
              f"{row['system_share']:17.0%} {row['faults_per_step']:17,.0f}")


if __name__ == "__main__":
    main()

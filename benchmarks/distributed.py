"""Throughput and peak memory of the same short fine-tune with 1 process and with 2 (FSDP2, DDP), side by side.

    python benchmarks/distributed.py [--model PATH] [--steps 8] [--peft] [--nproc 2]

Each setup runs through torchrun (`torch.distributed.run`); every rank times its own steps after a warm-up step
and reports tokens/s and its peak memory (CUDA: max allocated; CPU: peak resident set size of the process).
Numbers, not a test: paste the table into docs/guides/llm/distributed.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", REPO.parent / "shared" / "assets"))


def make_config(args, out_dir: Path, strategy: str) -> dict:
    squad = {"_target_": "automodel.data.squad.make_squad_dataset", "seq_length": args.seq_length,
             "dataset_name": str(ASSETS / "squad_v1.1" / "train-v1.1.subset.json"), "split": "train",
             "limit_dataset_samples": args.global_batch * (args.steps + 1)}
    cfg = {"recipe": "llm_finetune", "seed": 1234,
           "model": {"pretrained_model_name_or_path": args.model, "dtype": "float32"},
           "dataset": squad,
           "step_scheduler": {"global_batch_size": args.global_batch, "local_batch_size": args.local_batch,
                              "max_steps": args.steps + 1, "log_every_steps": 1000},
           "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4},
           "distributed": {"strategy": strategy},
           "checkpoint": {"checkpoint_dir": str(out_dir / "ckpt"), "enabled": False},
           "logging": {"progress_bar": False, "level": "WARNING"}}
    if args.peft:
        cfg["peft"] = {"target_modules": "all-linear", "dim": 8}
    return cfg


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(config_path: str, result_path: str) -> None:
    """One rank: the recipe's own steps, timed after a warm-up step; rank 0 writes every rank's numbers."""
    import torch.distributed as dist

    from automodel.training.recipe import FinetuneRecipe

    recipe = FinetuneRecipe(yaml.safe_load(Path(config_path).read_text()))
    recipe.setup()
    batches = iter(recipe.parts.data.train_loader)
    local_tokens, seconds = 0, 0.0
    for step in range(recipe.parts.data.max_steps):
        micro_batches = [next(batches) for _ in range(recipe.parts.grad_acc)]
        start = time.perf_counter()
        recipe.train_step(micro_batches)
        if step > 0:  # the first step pays for allocation and lazy initialisation
            seconds += time.perf_counter() - start
            local_tokens += sum(int(b["attention_mask"].sum()) for b in micro_batches)
    mine = {"rank": recipe.parts.parallel.rank, "tokens_per_s": local_tokens / seconds,
            "peak_mib": peak_memory_mib(recipe.parts.parallel.device), "step_s": seconds / (recipe.parts.data.max_steps - 1)}
    ranks = [mine]
    if recipe.parts.parallel.world_size > 1:
        ranks = [None] * recipe.parts.parallel.world_size
        dist.all_gather_object(ranks, mine)
    if recipe.parts.parallel.is_main:
        Path(result_path).write_text(json.dumps(ranks))
    recipe.parts.parallel.shutdown()


def run_setup(args, nproc: int, strategy: str, work: Path) -> list[dict]:
    folder = work / f"{strategy}_{nproc}"
    folder.mkdir()
    config, result = folder / "cfg.yaml", folder / "result.json"
    config.write_text(yaml.safe_dump(make_config(args, folder, strategy)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, "--worker", str(config), str(result)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads_per_rank)}
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=not args.verbose)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ASSETS / "models" / "stories260K"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after one warm-up step)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--local-batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--peft", action="store_true", help="LoRA instead of full SFT")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    setups = [(1, "none"), (args.nproc, "fsdp2"), (args.nproc, "ddp")]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    print(f"machine: {platform.node()}, {device}, torch {torch.__version__}; model {Path(args.model).name}, "
          f"{'LoRA' if args.peft else 'full SFT'}, global batch {args.global_batch}, local batch {args.local_batch}, "
          f"seq_length {args.seq_length}, {args.steps} timed steps, {args.threads_per_rank} thread(s) per rank")
    memory = "peak GPU MiB" if torch.cuda.is_available() else "peak RSS MiB"
    print(f"{'setup':<12} {'rank':>4} {'tokens/s (rank)':>16} {'tokens/s (job)':>15} {'s/step':>7} {memory:>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for nproc, strategy in setups:
            ranks = run_setup(args, nproc, strategy, Path(tmp))
            job = sum(r["tokens_per_s"] for r in ranks)
            for r in ranks:
                print(f"{f'{strategy} x{nproc}':<12} {r['rank']:>4} {r['tokens_per_s']:>16,.0f} {job:>15,.0f} "
                      f"{r['step_s']:>7.3f} {r['peak_mib']:>13,.0f}")


if __name__ == "__main__":
    main()

"""Memory of fine-tuning a model of a real size with 2 FSDP2 processes: the meta-device build against the old path.

    python benchmarks/big_model.py [--case lora3b sft1b moe2b lora7b qlora8b] [--scale 1.0] [--layers N]
                                   [--steps 3] [--paths meta full] [--processes 2] [--activation-checkpointing]
                                   [--workdir /tmp/big_model]

Each case first writes a random checkpoint of the named shape in the hub's layout (bf16, 2 GB shards with
`model.safetensors.index.json`, the real tokenizer; written shard by shard, never the whole model in memory), then
trains `--steps` steps through the CLI (`--nproc-per-node 2`, FSDP2; `--processes 1 2` adds one-process rows) and
saves the final step with its consolidated `model/` folder (the adapter for LoRA):
  lora3b  LoRA on a Llama-3.2-3B shape (hidden 3072, 28 layers, 24/8 heads, intermediate 8192, Llama 3 vocab)
  sft1b   full SFT of a TinyLlama-1.1B shape (hidden 2048, 22 layers, 32/4 heads, intermediate 5632, vocab 32000)
  moe2b   LoRA on a Mixtral shape cut to 8 layers of hidden 2048 (16/4 heads, 8 experts of 5632, top 2, vocab
          32000), stored as Mixtral's hub checkpoints store it: one w1/w2/w3 tensor per expert, which transformers
          fuses on load (so the build reads it one conversion group at a time)
  lora7b  LoRA on a Qwen2-7B shape (hidden 3584, 28 layers, 28/4 heads, intermediate 18944, vocab 152064, untied
          head, q/k/v biases), the frozen base in bf16 (`model.dtype: bfloat16`, fp32 adapters)
  qlora8b QLoRA (nf4, double quantisation, bf16 compute) on a Llama-3.1-8B shape (hidden 4096, 32 layers, 32/8
          heads, intermediate 14336, vocab 128256, untied head); one process only (bitsandbytes' packed weights do
          not shard)
`--scale` < 1 shrinks width and depth (not the vocabulary) to check the script on a small machine; `--layers N`
cuts the depth alone (every tensor keeps its real size).
`--activation-checkpointing` sets `distributed.activation_checkpointing: true` (the path column then ends in `+ac`).
Paths: `meta` is the default build (models/build.py); `full` is the whole-model load of every process (the same
loader named through `model._target_`, which takes the old path). Per process it reports the peak resident set
size (VmHWM, polled from /proc) once the run is set up (model built, data read: the run's banner), during training
and at the end (the save), as multiples of the model's fp32
size and of 16 bytes x parameters (fp32 weights, gradients and two AdamW states); for sft1b it also checks that the
saved `model/` folder equals the trained weights of the step's DCP state. Checkpoints are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", REPO.parent / "shared" / "assets"))
sys.path.insert(0, str(REPO))

SHAPES = {
    "lora3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                   intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "sft1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0),
    "moe2b": dict(hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False, rope_theta=1e6,
                  num_local_experts=8, num_experts_per_tok=2),
    "lora7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6),
    "qlora8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
LORA_CASES = ("lora3b", "moe2b", "lora7b", "qlora8b")
BF16_CASES = ("lora7b", "qlora8b")  # the frozen base in bf16 (fp32 adapters)
ONE_PROCESS_CASES = ("qlora8b",)


def scaled(shape: dict, scale: float) -> dict:
    """Width and depth times `scale` (head dim and head ratio kept); the vocabulary stays."""
    if scale >= 1:
        return dict(shape)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    ratio = shape["num_attention_heads"] // shape["num_key_value_heads"]
    kv = max(1, round(shape["num_key_value_heads"] * scale))
    return {**shape, "num_attention_heads": kv * ratio, "num_key_value_heads": kv, "hidden_size": kv * ratio * head_dim,
            "intermediate_size": round(shape["intermediate_size"] * scale / 64) * 64,
            "num_hidden_layers": max(2, round(shape["num_hidden_layers"] * scale))}


def shape_of(case: str, scale: float, layers: int | None) -> dict:
    shape = scaled(SHAPES[case], scale)
    return {**shape, "num_hidden_layers": layers} if layers else shape


def random_bf16(name: str, shape: tuple[int, ...], generator) -> "torch.Tensor":
    """Ones for a norm, zeros for a bias, else N(0, 0.02) drawn a block of rows at a time in bf16 (no fp32 copy of
    a whole embedding)."""
    import torch

    if len(shape) == 1:
        return (torch.zeros if name.endswith("bias") else torch.ones)(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    block = max(1, (1 << 24) // max(1, out[0].numel()))
    for start in range(0, shape[0], block):
        rows = out[start:start + block]
        rows.copy_(torch.randn(rows.shape, generator=generator) * 0.02)
    return out


def write_checkpoint(case: str, scale: float, folder: Path, layers: int | None = None) -> int:
    """A random bf16 checkpoint of the shape, shard by shard (never the whole model in memory); returns params.
    `layers` cuts the depth alone (the width, vocabulary and so every tensor keep the shape's sizes)."""
    import torch
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config
    from transformers.core_model_loading import revert_weight_conversion

    config_class = {"moe2b": MixtralConfig, "lora7b": Qwen2Config}.get(case, LlamaConfig)
    config = config_class(**shape_of(case, scale, layers), max_position_embeddings=4096, dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # the hub's names and shapes (per-expert tensors for Mixtral), by transformers' own reverse conversion
    tensors = revert_weight_conversion(model, dict(model.named_parameters()))
    plan = split_state_dict_into_shards_factory(tensors, get_storage_size=lambda t: t.numel() * t.element_size(),
                                                filename_pattern="model{suffix}.safetensors", max_shard_size="2GB")
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for filename, names in plan.filename_to_tensors.items():
        shard = {name: random_bf16(name, tuple(tensors[name].shape), generator) for name in names}
        save_file(shard, folder / filename, metadata={"format": "pt"})
        del shard
    index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
    if plan.is_sharded:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    tokenizer(case).save_pretrained(folder)
    return sum(t.numel() for t in tensors.values())


def tokenizer(case: str):
    if case in ("lora3b", "qlora8b"):  # the Llama 3 vocabulary of the shape
        from benchmarks.llama3_tokenizer import load_llama3_tokenizer

        return load_llama3_tokenizer(ASSETS / "tokenizers" / "llama3" / "tokenizer.model")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / ("qwen" if case == "lora7b" else "llama2"))


def run_config(case: str, model_dir: Path, out: Path, steps: int, path: str, checkpointing: bool = False) -> dict:
    model = {"pretrained_model_name_or_path": str(model_dir),
             "dtype": "bfloat16" if case in BF16_CASES else "float32"}
    if path == "full":
        model["_target_"] = "automodel.models.loader.load_causal_lm"  # a custom builder: the whole-model load
    cfg = {"recipe": "llm_finetune", "seed": 1234, "model": model,
           "dataset": {"_target_": "automodel.data.squad.make_squad_dataset", "seq_length": 256, "split": "train",
                       "dataset_name": str(ASSETS / "squad_v1.1" / "train-v1.1.subset.json"),
                       "limit_dataset_samples": 2 * steps + 2},
           "step_scheduler": {"global_batch_size": 2, "local_batch_size": 1, "max_steps": steps, "log_every_steps": 1,
                              "ckpt_every_steps": steps},
           "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-5},
           "distributed": {"strategy": "fsdp2", "activation_checkpointing": checkpointing},
           "checkpoint": {"checkpoint_dir": str(out / "ckpt"), "restore_from": None, "max_shard_size": "2GB"},
           "logging": {"progress_bar": False}}
    if case in LORA_CASES:
        cfg["peft"] = {"target_modules": "all-linear", "dim": 8, "alpha": 32}
    if case == "qlora8b":
        cfg["peft"]["quantization"] = {"type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    return cfg


def peak_rss(pid: int) -> int:
    """VmHWM (peak resident set size) of a process in bytes, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def workers(launcher: int) -> list[int]:
    """Pids of the processes under the launcher that run a rank (RANK in their environment)."""
    found, todo = [], [launcher]
    while todo:
        pid = todo.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
            if b"\0RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def train(cfg: dict, out: Path, processes: int = 2, emulate_bf16: bool = False) -> dict:
    """Run the CLI; per-rank peak RSS during training and at the end, seconds to the first step, step time.
    `emulate_bf16`: the ranks compute bf16 matmuls in fp32 (benchmarks/bf16_emulation/sitecustomize.py)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    metrics = out / "ckpt" / "metrics.jsonl"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(out / "cfg.yaml"),
                             "--nproc-per-node", str(processes)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **emulation_env(emulate_bf16)})
    output, set_up = [], threading.Event()

    def read_output():  # the run banner is printed once the model is built and the data read
        for line in proc.stdout:
            output.append(line)
            if "── automodel finetune llm" in line:
                set_up.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    peaks, load_peaks, train_peaks, first_step, last_step = {}, None, {}, None, None
    steps = cfg["step_scheduler"]["max_steps"]
    while proc.poll() is None:
        for pid in workers(proc.pid):
            peaks[pid] = max(peaks.get(pid, 0), peak_rss(pid))
        if set_up.is_set() and load_peaks is None:
            load_peaks = dict(peaks)
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        done = [r for r in records if r.get("kind") == "train"]
        if done and first_step is None:
            first_step = time.monotonic() - start
        if len(done) >= steps and last_step is None:
            last_step, train_peaks = time.monotonic(), dict(peaks)
        time.sleep(0.2)
    reader.join()
    output = "".join(output)
    if proc.returncode:
        (out / "output.log").write_text(output)
        return {"error": output.strip().splitlines()[-1] if output.strip() else f"exit {proc.returncode}"}
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    step_s = [r["step_s"] for r in records if r.get("kind") == "train"][1:]
    ranks = processes  # children a rank starts inherit RANK too, and are smaller
    return {"ranks": sorted(peaks.values())[-ranks:], "train_ranks": sorted(train_peaks.values())[-ranks:],
            "load_ranks": sorted((load_peaks or {}).values())[-ranks:],
            "first_step_s": first_step,
            "step_s": sum(step_s) / max(len(step_s), 1)}


def emulation_env(emulate_bf16: bool) -> dict:
    if not emulate_bf16:
        return {}
    paths = [str(REPO / "benchmarks" / "bf16_emulation"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(filter(None, paths))}


def check_saved_model(step_dir: Path) -> str:
    """The saved model/ folder against the step's trained weights (its DCP state), one safetensors file at a time."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    files = sorted((step_dir / "model").glob("*.safetensors"))
    for file in files:
        saved = load_file(file)
        trained = {"model": {name: torch.empty_like(t) for name, t in saved.items()}}
        dcp.load(trained, checkpoint_id=str(step_dir / "dcp"), no_dist=True)
        for name, tensor in saved.items():
            if not torch.equal(tensor, trained["model"][name]):
                return f"DIFFERS at {name}"
    return f"equal ({len(files)} files)"


RUNTIME = 1.5e9  # python, torch, transformers and the data in each process, measured at --scale 0.1


def expected_need(case: str, path: str, params: int, processes: int) -> float:
    """Bytes the processes are expected to need together: a whole-model load peaks at ~1.5x the size of the
    weights in each process (transformers' load), then FSDP2 keeps each process's share of the weights (+ gradients
    and AdamW states for full SFT); QLoRA holds ~0.6 bytes a parameter."""
    weights = (0.6 if case == "qlora8b" else 2 if case in BF16_CASES else 4) * params
    per_rank = (weights / processes if case in LORA_CASES else 16 * params / processes) + RUNTIME
    if path == "full":
        per_rank = max(per_rank, 1.5 * (2 if case == "qlora8b" else 1) * weights + RUNTIME)
    return processes * per_rank


def available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return float("inf")


def gb(value: float) -> str:
    return f"{value / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", choices=sorted(SHAPES), default=["lora3b", "moe2b", "sft1b"])
    parser.add_argument("--paths", nargs="+", choices=["meta", "full"], default=["meta", "full"])
    parser.add_argument("--processes", nargs="+", type=int, default=[2])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=None, help="cut the depth to this many layers")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--workdir", default="/tmp/big_model")
    parser.add_argument("--emulate-bf16", action="store_true",
                        help="bf16 cases on a CPU without native bf16: bf16 matmuls computed in fp32 and rounded "
                             "(benchmarks/bf16_emulation); every tensor kept stays bf16")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    rows = []
    try:
        for case in args.case:
            shutil.rmtree(workdir, ignore_errors=True)
            params = write_checkpoint(case, args.scale, workdir / "hub", args.layers)
            base = {"case": case, "params": params, "fp32": 4 * params}
            for processes in [1] if case in ONE_PROCESS_CASES else args.processes:
                for path in args.paths:
                    label = path + ("+ac" if args.activation_checkpointing else "")
                    need, free = expected_need(case, path, params, processes), available()
                    if need > free:  # the machine may be shared: never push it into the OOM killer
                        rows.append({**base, "path": label, "processes": processes,
                                     "error": f"skipped: needs ~{gb(need)} GB, {gb(free)} GB available"})
                        continue
                    out = workdir / f"{path}{processes}"
                    cfg = run_config(case, workdir / "hub", out, args.steps, path, args.activation_checkpointing)
                    result = train(cfg, out, processes, args.emulate_bf16 and case in BF16_CASES)
                    row = {**base, "path": label, "processes": processes, **result}
                    if "error" not in result and case == "sft1b":
                        row["saved"] = check_saved_model(out / "ckpt" / f"step_{args.steps}")
                    if "error" not in result and case in LORA_CASES:
                        adapter = out / "ckpt" / f"step_{args.steps}" / "model" / "adapter_model.safetensors"
                        row["saved"] = "adapter" if adapter.is_file() else "NO ADAPTER"
                    rows.append(row)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.emulate_bf16:
        print("\nbf16 matmuls of the bf16 cases computed as float32 matmuls of the same values (--emulate-bf16)")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'case':7} {'path':7} {'P':>1} {'params':>8} {'bf16 GB':>7} {'load peak GB/rank':>18} "
          f"{'train peak GB/rank':>19} {'end peak GB/rank':>17} {'sum GB':>7} {'max/bf16':>8} {'max/fp32':>8} "
          f"{'max/16B*P':>9} {'1st step s':>10} {'step s':>7}  saved model/")
    for row in rows:
        head = f"{row['case']:7} {row['path']:7} {row['processes']:>1} {row['params'] / 1e9:7.2f}B {gb(row['fp32'] / 2):>7}"
        if "error" in row:
            print(f"{head}  failed: {row['error'][:120]}")
            continue
        top = max(row["ranks"])
        print(f"{head} {' / '.join(gb(v) for v in row['load_ranks']):>18} "
              f"{' / '.join(gb(v) for v in row['train_ranks']):>19} {' / '.join(gb(v) for v in row['ranks']):>17} "
              f"{gb(sum(row['ranks'])):>7} {2 * top / row['fp32']:8.2f} {top / row['fp32']:8.2f} "
              f"{top / (4 * row['fp32']):9.2f} {row['first_step_s']:10.1f} {row['step_s']:7.2f}  "
              f"{row.get('saved', '-')}")


if __name__ == "__main__":
    main()

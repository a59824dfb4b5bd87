"""automodel vs HF Trainer vs TRL SFTTrainer on the same work, side by side (issue 9's work unit).

Work unit: the first 128 rows of the real SQuAD train subset, prompt `Context: ... Question: ... Answer: `, loss on
answer + EOS, max length 512 (the context is cut, never the answer), global batch 8, AdamW lr 1e-4, one epoch, fp32,
2 threads; a Llama from config (hidden 256, intermediate 1024, 4 layers, 4 heads, untied, vocab 32,000 with the real
Llama-2 tokenizer), the pretrained stories260K (vocab 512, 256 rows) and the pretrained SmolLM2-135M-Instruct
(the README's main model: hidden 576, 30 layers, vocab 49,152, tied; LoRA on 16 rows), read by every contender from
the HF folder automodel dequantises its GGUF file into. Each contender trains in its own process, the contenders
interleaved round by round, on the same rows in the same order.

    python benchmarks/peers.py                       # every scenario, automodel + peers (needs the `bench` extra)
    python benchmarks/peers.py --quick --contenders automodel --scenarios stories-sft    # smoke test, seconds

Prints, per scenario: real tokens/s, label tokens/s, padding share, peak RSS, mean loss of the last 4 steps, the
ratios to the best peer (HF Trainer / TRL, each at its best precision: `hf-trainer:bf16` is the Trainer's `bf16=True`,
which autocasts on a CPU too), and the share of this machine's bf16 limit: the work's necessary FLOPs per second (see
`necessary_flops`) over the bf16 matmul rate measured at the model's own shapes in the same run (the fp32 rate, and
an `of fp32 limit` column, on a CPU without native bf16, where `precision: auto` trains in fp32 too). `automodel`
uses the library defaults (precision auto, padding-free batches, `automodel_sdpa`); `automodel:fp32` forces fp32;
`automodel:padded` pads the same batches as the peers; `automodel:sdpa` also runs transformers'
own sdpa attention, as the peers do (the library as it was before `automodel_sdpa`); `automodel:grouped` and
`automodel:packedN` force length grouping or packing into rows of N tokens; `automodel:unchunked` computes the
label positions' logits in one piece (`loss_fn.chunk_size: null`) instead of the chunked output head;
`automodel:adamw-foreach` / `automodel:adamw-fused` switch AdamW's implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", REPO.parent / "shared" / "assets")).resolve()
SQUAD = ASSETS / "squad_v1.1" / "train-v1.1.subset.json"
PEERS = ("hf-trainer", "hf-trainer:bf16", "trl", "trl-packing")
DEFAULT_CONTENDERS = "automodel,automodel:fp32,hf-trainer,hf-trainer:bf16"
# name -> (model, lora, rows)
SCENARIOS = {
    "llama32k-sft": ("llama32k", False, 128),
    "llama32k-lora": ("llama32k", True, 128),
    "stories-sft": ("stories", False, 256),
    "stories-lora": ("stories", True, 256),
    "smollm2-lora": ("smollm2", True, 64),
    "smollm2-sft": ("smollm2", False, 64),
}
SMOL = ASSETS / "models" / "SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA32K = dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make_llama32k(folder: Path) -> Path:
    """A seeded random-init Llama (issue 9's shape) saved with the real Llama-2 tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA32K)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(ASSETS / "tokenizers" / "llama2" / name, folder / name)
    return folder


def model_folder(name: str, workdir: Path) -> Path:
    if name == "smollm2":
        # The dequantised HF folder automodel caches for the GGUF file: the same weights for every contender.
        from automodel.models.gguf import dequantised_folder

        return Path(dequantised_folder(str(SMOL), SMOL_FILE))
    return ASSETS / "models" / "stories260K" if name == "stories" else make_llama32k(workdir / "llama32k")


def run_contender(contender: str, model_dir: Path, rows: int, lora: bool, workdir: Path, threads: int,
                  worker_flags: list[str] = ()) -> dict:
    """Train `contender` in a fresh process (`worker_flags`: --bf16, --batch N, --seq-length N) and return its report."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = workdir / f"run-{contender.replace(':', '-')}-{time.monotonic_ns()}"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", contender, "--model-dir", str(model_dir),
               "--rows", str(rows), "--out", str(out), "--threads", str(threads)] + (["--lora"] if lora else []) + list(worker_flags)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{contender} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def model_shape(model_dir: Path) -> dict:
    """What the FLOP count needs: layers, hidden size, vocabulary, and the decoder's parameters (embedding and output
    head excluded: the head's work is counted at label tokens only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    body = sum(p.numel() for name, p in model.model.layers.named_parameters())
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
            "body_params": body, "intermediate": config.intermediate_size}


def necessary_flops(shape: dict, lora: bool, result: dict) -> float:
    """The FLOPs the work cannot do without (forward + backward), whoever computes it: the decoder layers at every
    real token (2N forward, 2N for the input gradients, and 2N for the weight gradients unless LoRA freezes them; the
    adapters' own FLOPs are under 1% and left out), causal attention (6 x layers x hidden x length^2 per row, as
    benchmarks/gpu_peers.py counts it) and the output head at the label tokens only (2VH forward and 2VH backward,
    plus 2VH for its weight gradient when trained)."""
    body = (4 if lora else 6) * shape["body_params"] * result["real_tokens"]
    attention = 6.0 * shape["layers"] * shape["hidden"] * result["sum_squared_lengths"]
    head = (4 if lora else 6) * shape["vocab"] * shape["hidden"] * result["label_tokens"]
    return body + attention + head


def limit_dtype() -> str:
    """The precision of this machine's matmul limit: bf16 where the CPU computes it natively, else fp32 (without
    AVX512-BF16 or AMX, torch computes bf16 matmuls through a conversion far slower than fp32's: no limit at all)."""
    import torch

    from automodel.config.precision import native_bf16

    return "bf16" if native_bf16(torch.device("cpu"))[0] else "fp32"


def matmul_gflops(shape: dict, threads: int, dtype: str, repeats: int = 20) -> float:
    """This machine's matmul rate in `dtype` with `threads` threads, at the model's shapes (4096 tokens against each
    of the MLP's and attention's weight shapes) and a square 2048 one: the best of them, the limit to compare with."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    hidden, inner = shape["hidden"], shape["intermediate"]
    best = 0.0
    for m, k, n in ((4096, hidden, inner), (4096, inner, hidden), (4096, hidden, hidden), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9)
    return best


def summarize(runs: list[dict]) -> dict:
    """Median over rounds of the throughputs; the counts and losses are identical across rounds."""
    first = runs[0]
    return {
        "tokens_per_s": statistics.median(r["real_tokens"] / r["seconds"] for r in runs),
        "label_tokens_per_s": statistics.median(r["label_tokens"] / r["seconds"] for r in runs),
        "tokens_per_cpu_s": statistics.median(r["real_tokens"] / r["cpu_seconds"] for r in runs),
        "padding": 1 - first["real_tokens"] / first["positions"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "last4_loss": statistics.mean(first["losses"][-4:]),
        "real_tokens": first["real_tokens"], "label_tokens": first["label_tokens"], "steps": len(first["losses"]),
        "sum_squared_lengths": first["sum_squared_lengths"],
        "seconds": statistics.median(r["seconds"] for r in runs),
    }


def table(scenario: str, results: dict[str, dict], limit_of=None, limit_name: str = "bf16") -> str:
    """`limit_of(result)`: the share of the machine's matmul limit (`limit_name`: bf16, or fp32 on a CPU without
    native bf16) the contender reached (necessary FLOPs / s over the measured matmul rate); None leaves that column
    out."""
    peers = {name: r for name, r in results.items() if name in PEERS}
    best_speed = max((r["tokens_per_s"] for r in peers.values()), default=None)
    best_rss = min((r["peak_rss_mb"] for r in peers.values()), default=None)
    best_cpu = max((r["tokens_per_cpu_s"] for r in peers.values()), default=None)
    lines = [f"### {scenario}", "",
             "| contender | real tokens/s | label tokens/s | padding | peak RSS | loss (last 4 steps) | "
             "speed vs best peer | RSS vs best peer | real tokens per CPU s | per CPU s vs best peer |"
             + (f" of {limit_name} limit |" if limit_of else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if limit_of else "")]
    for name, r in results.items():
        speed = f"{r['tokens_per_s'] / best_speed:.2f}x" if best_speed else "-"
        rss = f"{r['peak_rss_mb'] / best_rss:.2f}x" if best_rss else "-"
        cpu = f"{r['tokens_per_cpu_s'] / best_cpu:.2f}x" if best_cpu else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['label_tokens_per_s']:,.0f} | {r['padding']:.1%} | "
                     f"{r['peak_rss_mb'] / 1024:.2f} GB | {r['last4_loss']:.4f} | {speed} | {rss} | "
                     f"{r['tokens_per_cpu_s']:,.0f} | {cpu} |" + (f" {limit_of(r):.0%} |" if limit_of else ""))
    counts = {(r["real_tokens"], r["label_tokens"]) for r in results.values()}
    lines += ["", f"same rows for every contender: {'yes' if len(counts) == 1 else 'NO: ' + str(counts)}; "
                  f"{next(iter(results.values()))['steps']} steps", ""]
    return "\n".join(lines)


def machine_line(threads: int) -> str:
    import platform

    import torch
    import transformers

    load = os.getloadavg()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"machine: {cpu}, {os.cpu_count()} cores, {threads} threads per run; load average at start "
            f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}" + trl_version())


def trl_version() -> str:
    try:
        import trl
    except ImportError:
        return ""
    return f", trl {trl.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                        help="comma list: automodel[:fp32|:padded|:sdpa|:grouped|:packedN|:unchunked|:adamw-foreach|"
                             ":adamw-fused], hf-trainer, hf-trainer:bf16, trl, trl-packing")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (median tokens/s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="16 rows: a smoke test, not a measurement")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--seq-length", type=int, default=512, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from peer_workers import Work, run_worker

        work = Work(args.model_dir, str(SQUAD), args.rows, args.seq_length, args.lora, args.out, args.batch, args.bf16)
        return run_worker(args.worker, work, args.threads)

    unknown = [s for s in args.scenarios.split(",") if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    contenders = args.contenders.split(",")
    print(machine_line(args.threads), flush=True)
    everything = {}
    with tempfile.TemporaryDirectory(prefix="automodel-peers-") as tmp:
        for scenario in args.scenarios.split(","):
            model, lora, rows = SCENARIOS[scenario]
            rows = 16 if args.quick else rows
            model_dir = model_folder(model, Path(tmp))
            shape = model_shape(model_dir)
            dtype = limit_dtype()
            gflops = matmul_gflops(shape, args.threads, dtype)
            print(f"  {scenario}: {dtype} matmul limit at the model's shapes {gflops:,.0f} GFLOP/s "
                  f"({args.threads} threads)", flush=True)
            runs: dict[str, list[dict]] = {c: [] for c in contenders}
            for _ in range(args.rounds):
                for contender in contenders:
                    run = run_contender(contender, model_dir, rows, lora, Path(tmp), args.threads)
                    runs[contender].append(run)
                    print(f"  {scenario} {contender}: {run['real_tokens'] / run['seconds']:,.0f} real tokens/s, "
                          f"{run['seconds']:.0f} s ({run['cpu_seconds']:.0f} CPU s), load {os.getloadavg()[0]:.2f}",
                          flush=True)
            everything[scenario] = {c: summarize(r) for c, r in runs.items()}

            def limit_of(result: dict, shape=shape, lora=lora, gflops=gflops) -> float:
                return necessary_flops(shape, lora, result) / result["seconds"] / (gflops * 1e9)

            for name, result in everything[scenario].items():
                result["limit_share"], result["limit_dtype"] = limit_of(result), dtype
            print(table(f"{scenario} ({rows} rows, {'LoRA r=8' if lora else 'full SFT'})", everything[scenario],
                        limit_of, dtype), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()

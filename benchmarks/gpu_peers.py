"""automodel vs HF Trainer on one GPU: LoRA and full SFT of a Llama-3.2-1B-shaped model, bf16, SDPA.

A seeded random-init model with Llama 3.2 1B's shape (hidden 2048, 16 layers, 32/8 heads, vocab 128,256, tied) and
the real Llama 3 tokenizer from the shared assets; SQuAD train rows (prompt -> answer + EOS, max length 1024). Each
contender trains in its own process on the same rows in the same order (benchmarks/peer_workers.py). Prints real
tokens/s, MFU against the bf16 matmul rate measured on this card, peak GPU memory and the loss, in one call that
fits in 10 minutes on an H200:

    python benchmarks/gpu_peers.py                 # needs a CUDA GPU and the `bench` extra
    python benchmarks/gpu_peers.py --rows 512      # shorter

MFU is PaLM's model-FLOPs utilisation: 6 x parameters per real token plus causal attention (6 x layers x hidden x
length^2 per row), whatever the contender actually computes, so skipping the output head where no label is and
skipping padding both show up as a higher MFU, and LoRA is measured against the same full-model FLOPs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama3_tokenizer import load_llama3_tokenizer  # noqa: E402
from peers import ASSETS, run_contender, summarize  # noqa: E402

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                    rms_norm_eps=1e-5,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
CONTENDERS = ("automodel", "hf-trainer")


def make_model_folder(folder: Path, device: str = "cuda", **shape_overrides) -> Path:
    """Seeded random-init Llama (bf16) + the Llama 3 tokenizer, saved in HF layout. `shape_overrides` shrink it
    (the test does, on the CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_3_2_1B, **shape_overrides})).to(torch.bfloat16)
    model.save_pretrained(folder)
    load_llama3_tokenizer(ASSETS / "tokenizers" / "llama3" / "tokenizer.model").save_pretrained(folder)
    return folder


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def model_flops(parameters: int, layers: int, hidden: int, real_tokens: int, sum_squared_lengths: int) -> float:
    """Training FLOPs of the work (forward + backward): 6N per token plus causal attention."""
    return 6.0 * parameters * real_tokens + 6.0 * layers * hidden * sum_squared_lengths


def bf16_matmul_tflops(size: int = 8192, repeats: int = 50) -> float:
    """The card's measured dense bf16 matmul rate (the MFU denominator)."""
    import torch

    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1000) / 1e12


def table(title: str, results: dict[str, dict], flops_of, peak_tflops: float) -> str:
    base = results.get("hf-trainer")
    lines = [f"### {title}", "", "| contender | real tokens/s | MFU | peak GPU memory | loss (last 4 steps) | "
             "speed vs HF Trainer |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        mfu = flops_of(r) / r["seconds"] / (peak_tflops * 1e12)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu:.1%} | {r['peak_gpu_mb'] / 1024:.1f} GiB | "
                     f"{r['last4_loss']:.4f} | {ratio} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_peers.py needs a CUDA GPU; benchmarks/peers.py is the CPU benchmark")
    peak = bf16_matmul_tflops()
    print(f"device: {torch.cuda.get_device_name()}; measured bf16 matmul {peak:.0f} TFLOP/s; torch {torch.__version__}",
          flush=True)
    flags = ["--bf16", "--batch", str(args.batch), "--seq-length", str(args.seq_length)]
    with tempfile.TemporaryDirectory(prefix="automodel-gpu-peers-") as tmp:
        folder = make_model_folder(Path(tmp) / "llama-3.2-1b-shape")
        parameters = parameter_count(folder)
        shape = LLAMA_3_2_1B

        def flops_of(result: dict) -> float:
            return model_flops(parameters, shape["num_hidden_layers"], shape["hidden_size"], result["real_tokens"],
                               result["sum_squared_lengths"])

        for lora in (True, False):
            results = {}
            for contender in CONTENDERS:
                run = run_contender(contender, folder, args.rows, lora, Path(tmp), args.threads, flags)
                results[contender] = {**summarize([run]), "seconds": run["seconds"],
                                      "peak_gpu_mb": run["peak_gpu_mb"],
                                      "sum_squared_lengths": run["sum_squared_lengths"]}
            title = (f"Llama-3.2-1B shape, {'LoRA r=8' if lora else 'full SFT'}, bf16, {args.rows} rows, "
                     f"batch {args.batch}, {parameters:,} parameters")
            print(table(title, results, flops_of, peak), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

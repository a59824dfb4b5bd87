"""Why does bf16 LoRA end above fp32 LoRA? Per-step losses of the same work under each precision, side by side.

    python benchmarks/bf16_lora_gap.py [--variants fp32 bf16-frozen bf16-mixed] [--rows 64] [--seq-length 512]

The work is benchmarks/peers.py's SmolLM2 LoRA cell (the pretrained SmolLM2-135M-Instruct, the first 64 SQuAD
train rows, global batch 8, AdamW lr 1e-4 constant, LoRA r8/alpha 32 on every linear layer of the decoder, no
shuffling), trained by automodel's recipe in one fresh process per variant.

On a CPU without native bf16 (no AVX512-BF16 or AMX), torch's bf16 matmuls run emulated, and the backward's
(grad_output @ weight) layout at about 1% of the fp32 rate: a bf16 run would take hours. There the bf16 variants
run under `Bf16GemmInFp32`, which computes each matmul with bf16 operands as a float32 matmul of the same
(bf16-valued) operands and rounds the result to bf16: the products of two bf16 numbers are exact in float32 and
native bf16 GEMMs accumulate in float32 too, so this is the native computation up to the order of the sums. Every
other operation runs in bf16 as it would natively. The table's header says which was used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# A `precision` value, and with `:peft-add` the LoRA layers on peft's own forward (the update added to the already
# rounded base output, as the HF Trainer's bf16=True computes it).
VARIANTS = ("fp32", "bf16-frozen", "bf16-mixed", "bf16-frozen:peft-add", "bf16-mixed:peft-add")


BLOCK = 1 << 24  # elements of one float32 operand block (64 MB)


def blocked_fp32_matmul(a, b, addend=None):
    """`addend + a @ b` for 2-D bf16 operands, computed in float32 and rounded once to bf16, a block of rows of `a`
    and of columns of `b` at a time: a float32 copy of a whole large operand (a 7B model's output head is 2.2 GB in
    float32) would add to the peak memory that benchmarks/big_model.py measures."""
    import torch

    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)
    rows = max(1, BLOCK // max(1, a.shape[1]))
    cols = max(1, BLOCK // max(1, b.shape[0]))
    for j in range(0, b.shape[1], cols):
        b_block = b[:, j:j + cols].float()
        for i in range(0, a.shape[0], rows):
            block = a[i:i + rows].float() @ b_block
            if addend is not None:
                block += addend.expand(out.shape)[i:i + rows, j:j + cols].float()
            out[i:i + rows, j:j + cols] = block
    return out


def bf16_gemm_in_fp32_mode():
    """A dispatch mode that computes bf16 matmuls as float32 matmuls of the same values, rounded back to bf16."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    batched = {aten.bmm.default, aten.baddbmm.default}

    class Bf16GemmInFp32(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            bf16 = any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args)
            if not bf16 or kwargs.get("out") is not None:
                return func(*args, **kwargs)
            if func is aten.mm.default:
                Bf16GemmInFp32.calls += 1
                return blocked_fp32_matmul(*args)
            if func is aten.addmm.default and not kwargs:
                Bf16GemmInFp32.calls += 1
                addend, a, b = args
                return blocked_fp32_matmul(a, b, addend)
            if func in batched:
                Bf16GemmInFp32.calls += 1
                up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
                return func(*up, **kwargs).to(torch.bfloat16)
            return func(*args, **kwargs)

    return Bf16GemmInFp32


def worker(variant: str, model_dir: str, rows: int, seq_length: int, out: str, emulate: bool) -> None:
    import torch

    from benchmarks.peer_workers import Work, automodel_config
    from benchmarks.peers import SQUAD
    from automodel.config import precision as precision_module
    from automodel.training.recipe import FinetuneRecipe

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = Work(model_dir=model_dir, squad=str(SQUAD), rows=rows, seq_length=seq_length, lora=True, out=out)
    cfg = automodel_config(work, "default")
    precision, _, how = variant.partition(":")
    cfg["precision"] = precision
    if how == "peft-add":  # the LoRA layers take peft's forward, as before automodel/peft/fused_lora.py
        from automodel.peft.fused_lora import FusedLoraLinear

        FusedLoraLinear.fuses = lambda self, x: False
    if emulate:  # the recipe refuses bf16 on this CPU: the mode below computes what a native one would
        precision_module.native_bf16 = lambda device: (True, "bf16 GEMMs computed in fp32 (Bf16GemmInFp32)")
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    mode = bf16_gemm_in_fp32_mode() if emulate and precision != "fp32" else None
    if mode is not None:
        with mode():
            result = recipe.train()
    else:
        result = recipe.train()
    print("RESULT " + json.dumps({"losses": result.train_losses, "emulated_gemms": mode.calls if mode else 0,
                                  "precision": recipe.parts.parallel.precision.describe()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--emulate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.rows, args.seq_length, args.out, args.emulate)
        return
    import torch

    from benchmarks.peers import SMOL, SMOL_FILE
    from automodel.config.precision import native_bf16
    from automodel.models.gguf import dequantised_folder

    native, why = native_bf16(torch.device("cpu"))
    model_dir = dequantised_folder(str(SMOL), SMOL_FILE)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            command = [sys.executable, __file__, "--worker", variant, "--model-dir", str(model_dir), "--rows",
                       str(args.rows), "--seq-length", str(args.seq_length), "--out", str(Path(tmp) / variant)]
            done = subprocess.run(command + ([] if native else ["--emulate"]), capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            results[variant] = json.loads(lines[-1].removeprefix("RESULT "))
            print(f"{variant}: {results[variant]['precision']}", flush=True)
    print(f"\nbf16 matmuls: {'native' if native else 'computed in fp32 and rounded (Bf16GemmInFp32): ' + why}")
    steps = len(next(iter(results.values()))["losses"])
    width = max(len(v) for v in results) + 1
    print("step  " + "".join(f"{v:>{width}}" for v in results))
    for step in range(steps):
        print(f"{step + 1:>4}  " + "".join(f"{results[v]['losses'][step]:{width}.4f}" for v in results))
    last = {v: sum(r["losses"][-4:]) / len(r["losses"][-4:]) for v, r in results.items()}
    print("last4 " + "".join(f"{last[v]:{width}.4f}" for v in results))
    print("vs fp32" + "".join(f"{last[v] - last['fp32']:+{width - 1}.4f}" for v in results) if "fp32" in last else "")


if __name__ == "__main__":
    main()

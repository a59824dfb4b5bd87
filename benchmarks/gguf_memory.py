"""Peak memory of dequantising a GGUF file into its safetensors copy: whole model in memory vs tensor by tensor.

    python benchmarks/gguf_memory.py [--gguf PATH] [--dtype float32 bfloat16]

Each way runs in a fresh interpreter on the same file (default: the shared assets' SmolLM2-135M-Instruct Q4_1):
`whole` is transformers' from_pretrained(gguf_file=...) followed by safetensors' save_file (the path automodel
took before, still used for the architectures transformers converts through its newer GGUF pipeline);
`streamed` is automodel.models.gguf.write_dequantised (gguf's reader, one tensor dequantised, translated and
written at a time); `metadata` does only what both do whatever the model's size (gguf's reader, the config dict,
the tokenizer), so the difference to it is what the weights cost. Printed per way and dtype: peak RSS (VmHWM) of the whole process, the same after the imports
(what the work itself added), wall time, and the size of the written weights.
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
ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", REPO.parent / "shared" / "assets")).resolve()
SMOL = ASSETS / "models" / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct.Q4_1.gguf"

WORKER = """
import json, sys, time
from pathlib import Path

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

import torch, transformers, gguf, safetensors.torch  # imported before the measurement starts
from automodel.models import gguf as automodel_gguf

way, path, folder, dtype = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
after_imports = peak_mb()
start = time.perf_counter()
if way == "streamed":
    automodel_gguf.write_dequantised(path, folder, dtype)
elif way == "metadata":  # what both ways read whatever the model's size: the reader, config and tokenizer
    from gguf import GGUFReader
    from transformers import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    GGUFReader(path).tensors  # parsed, then dropped, as the streamed way does before the tokenizer
    config_dict = load_gguf_checkpoint(str(path))["config"]
    automodel_gguf.write_config_and_tokenizer(path, folder, CONFIG_MAPPING[config_dict["model_type"]].from_dict(
        dict(config_dict)))
else:
    automodel_gguf.write_dequantised_whole(path, folder, getattr(torch, dtype), automodel_gguf.load_config(path))
print(json.dumps({"peak_mb": peak_mb(), "imports_mb": after_imports, "seconds": time.perf_counter() - start,
                  "weights_mb": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20}))
"""


def run(way: str, path: Path, dtype: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="gguf_memory_") as folder:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        out = subprocess.run([sys.executable, "-c", WORKER, way, str(path), folder, dtype], env=env, check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=SMOL)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    print(f"{args.gguf.name} ({args.gguf.stat().st_size / 2**20:,.0f} MB file)")
    print(f"{'dtype':<9} {'way':<9} {'peak RSS MB':>11} {'added by the work MB':>21} {'seconds':>8} {'weights MB':>11}")
    for dtype in args.dtype:
        results = {way: run(way, args.gguf, dtype) for way in ("whole", "streamed", "metadata")}
        for way, r in results.items():
            print(f"{dtype:<9} {way:<9} {r['peak_mb']:>11,.0f} {r['peak_mb'] - r['imports_mb']:>21,.0f} "
                  f"{r['seconds']:>8.1f} {r['weights_mb']:>11,.0f}")
        whole, streamed, metadata = (results[w]["peak_mb"] - results[w]["imports_mb"]
                                     for w in ("whole", "streamed", "metadata"))
        print(f"{dtype:<9} streamed / whole, memory added by the work: {streamed / whole:.2f}x; over the metadata "
              f"alone (the weights' share): whole {whole - metadata:,.0f} MB, streamed {streamed - metadata:,.0f} MB")


if __name__ == "__main__":
    main()

"""llama.cpp's own quantizer for the k-quants (Q4_K_M and the like), which the `gguf` package cannot write.

The k-quants choose a type per tensor (llama.cpp's `llama_model_quantize`: Q4_K_M keeps some attention and FFN
tensors at Q6_K, ...); only llama.cpp implements that, so the export writes an F32 or BF16 GGUF file first and hands
it to llama.cpp: the `llama-quantize` program, or the same function through llama-cpp-python's binding, in this
Python or in another one (`--quantizer .venv-llamacpp/bin/python`, which scripts/setup_llamacpp.sh builds).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

from automodel.errors import UserError

HOW_TO_GET = ("put llama.cpp's `llama-quantize` on PATH, `pip install llama-cpp-python`, or pass "
              "--quantizer PATH (llama-quantize, or a Python with llama-cpp-python: `bash scripts/setup_llamacpp.sh` "
              "builds .venv-llamacpp/bin/python)")

# what runs in the quantizer's Python: llama-cpp-python's binding of llama_model_quantize
QUANTIZE_CODE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
status = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(1 if status else 0)
"""


def k_quant_types() -> dict[str, int]:
    """Type names llama.cpp's quantizer makes without an importance matrix -> their gguf.LlamaFileType value."""
    import gguf

    return {member.name.removeprefix("MOSTLY_"): int(member) for member in gguf.LlamaFileType
            if member.name.startswith("MOSTLY_Q") and member.name != "MOSTLY_Q8_0"}


def find_quantizer(quantizer: str | None, type_name: str) -> list[str]:
    """The command that quantizes (input, output, file type appended), or a one-line error saying how to get one."""
    if quantizer:
        path = Path(quantizer).expanduser()
        if not path.is_file():
            raise UserError(f"--quantizer: {quantizer} does not exist")
        if path.name.startswith("python"):
            return [str(path), "-c", QUANTIZE_CODE]
        return [str(path)]
    if found := shutil.which("llama-quantize"):
        return [found]
    if importlib.util.find_spec("llama_cpp") is not None:
        import sys

        return [sys.executable, "-c", QUANTIZE_CODE]
    raise UserError(f"--type {type_name}: llama.cpp's quantizer is not installed: {HOW_TO_GET}")


def quantize(command: list[str], source: Path, output: Path, type_name: str) -> None:
    """Run llama.cpp's quantizer from `source` (F32/BF16 GGUF) to `output`."""
    file_type = k_quant_types()[type_name]
    # llama-quantize takes the type by name, the binding by number
    args = [*command, str(source), str(output), type_name if command[1:2] != ["-c"] else str(file_type)]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0 or not output.is_file():
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"--type {type_name}: llama.cpp's quantizer ({command[0]}) failed: {last[0]}")

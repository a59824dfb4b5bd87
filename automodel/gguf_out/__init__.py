"""`automodel export MODEL --format gguf`: a model or LoRA fine-tune as one GGUF file for llama.cpp and Ollama.

MODEL is anything the after-training commands take (checkpoint_dir, step folder, model or adapter folder, GGUF
file); a LoRA adapter is merged into its base first (peft's merge_and_unload, in place). writer.py writes F32, F16,
BF16 and Q8_0 itself; the k-quants go through llama.cpp's quantizer (llamacpp.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from automodel.errors import UserError

logger = logging.getLogger("automodel")


def type_names() -> list[str]:
    from automodel.gguf_out.llamacpp import k_quant_types
    from automodel.gguf_out.writer import DIRECT_TYPES

    return [*DIRECT_TYPES, *k_quant_types()]


def check_type(type_name: str) -> str:
    wanted = type_name.upper()
    if wanted not in type_names():
        raise UserError(f"--type: unknown GGUF type '{type_name}'; known: {', '.join(type_names())}")
    return wanted


def check_output(output: str | None) -> Path:
    if not output:
        raise UserError("--output: give the .gguf file to write (--format gguf)")
    path = Path(output).expanduser()
    if path.suffix != ".gguf":
        raise UserError(f"--output: {output} is not a .gguf file name")
    if path.exists():
        raise UserError(f"--output: {path} already exists; remove it or choose another name")
    return path


def check_architecture(source, trust_remote_code: bool = False) -> None:
    """Stop on an unsupported architecture before the weights are loaded (a GGUF base is checked once loaded). A
    family automodel reads into a native class is checked as that native config, one read into an own class by
    that class's rules (gguf_out/families.py)."""
    if source.gguf_file:
        return
    from transformers import PretrainedConfig

    from automodel.gguf_out.architectures import rules_for
    from automodel.gguf_out.families import export_config, loaded_class

    config, _ = PretrainedConfig.get_config_dict(source.base)
    rules_for(export_config(config, source.base, trust_remote_code), loaded_class(config, trust_remote_code),
              warn=False)


def load_merged(source, dtype: str | None, trust_remote_code: bool):
    """The model with its adapter (if any) folded in, on the CPU, and its tokenizer."""
    from automodel.inference.generate import load_model_and_tokenizer
    from automodel.inference.merge import stored_dtype

    dtype = dtype or (None if source.gguf_file else stored_dtype(source.base))
    model, tokenizer = load_model_and_tokenizer(source, dtype, trust_remote_code, device="cpu")
    if source.adapter is not None:
        model = model.merge_and_unload()
    return model, tokenizer


def export_gguf(model: str, output: str | None, type_name: str = "F16", adapter: str | None = None,
                quantizer: str | None = None, trust_remote_code: bool = False) -> Path:
    """Write MODEL (merged with its LoRA adapter) as one .gguf file; returns its path."""
    from automodel.gguf_out import llamacpp
    from automodel.gguf_out.writer import DIRECT_TYPES, write_gguf
    from automodel.inference.sources import resolve_source
    from automodel.models.gguf import require_gguf_package

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs each file and its byte order at INFO
    type_name = check_type(type_name)
    path = check_output(output)
    require_gguf_package("--format gguf")
    command = None if type_name in DIRECT_TYPES else llamacpp.find_quantizer(quantizer, type_name)
    source = resolve_source(model, adapter)
    check_architecture(source, trust_remote_code)
    # F32 is exact whatever the stored dtype; the other types are made from the stored dtype, as llama.cpp does
    loaded, tokenizer = load_merged(source, "float32" if type_name == "F32" else None, trust_remote_code)
    logger.info("exporting %s (%s) as GGUF %s", source.describe(), loaded.dtype, type_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if command is None:
        return write_gguf(loaded, tokenizer, path, type_name, path.stem)
    import torch

    base_type = "F32" if loaded.dtype == torch.float32 else "BF16"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
        unquantized = write_gguf(loaded, tokenizer, Path(folder) / f"model-{base_type}.gguf", base_type, path.stem)
        del loaded
        partial = Path(folder) / path.name
        llamacpp.quantize(command, unquantized, partial, type_name)
        partial.replace(path)
    logger.info("GGUF %s made by llama.cpp's quantizer from %s: %s", type_name, base_type, path)
    return path

"""Prepare a folder vLLM serves, and the `vllm serve` command for it.

Two layouts: merged weights (one plain HF folder: `vllm serve FOLDER`), or the base model plus a LoRA
adapter (`vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER --max-lora-rank R`). vLLM's LoRA
loader (vllm/lora/peft_helper.py, vllm/config/lora.py) needs `r`, `lora_alpha` and `target_modules` in
adapter_config.json, rejects DoRA, `modules_to_save` and LoRA biases, and refuses ranks above
`--max-lora-rank` (default 16, one of 1, 8, 16, 32, 64, 128, 256, 320, 512). It adapts the linear layers
of the decoder blocks; Llama-family models pack q/k/v and gate/up projections, which it handles.
"""

from __future__ import annotations

import importlib.util
import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from automodel.errors import UserError
from automodel.inference.merge import check_output_dir, merge_lora
from automodel.inference.sources import ADAPTER_CONFIG, ModelSource, read_json

logger = logging.getLogger("automodel")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
DECODER_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# Architectures whose vLLM implementation supports LoRA, with the module names it adapts.
VLLM_LORA_MODULES = {arch: DECODER_LINEARS for arch in (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM", "GraniteForCausalLM")}
INSTALL_HINT = "vLLM is not installed: `pip install vllm` (Linux with an NVIDIA GPU), then run the command above"


@dataclass
class ServePlan:
    """The prepared folder and the argv that serves it."""

    folder: Path
    command: list[str]

    def shell_command(self) -> str:
        return shlex.join(self.command)


def check_adapter_for_vllm(adapter: Path, architecture: str | None) -> dict:
    """adapter_config.json, checked against what vLLM's LoRA loader accepts; returns it."""
    config = read_json(adapter / ADAPTER_CONFIG)
    where = f"{adapter / ADAPTER_CONFIG}"
    missing = [k for k in ("r", "lora_alpha", "target_modules") if config.get(k) in (None, [], "")]
    if missing:
        raise UserError(f"{where}: vLLM needs {', '.join(missing)}")
    if config.get("use_dora"):
        raise UserError(f"{where}: vLLM does not serve DoRA adapters; use --merge to serve merged weights")
    if config.get("modules_to_save"):
        raise UserError(f"{where}: vLLM does not load modules_to_save ({config['modules_to_save']}); use --merge")
    if config.get("bias", "none") != "none":
        raise UserError(f"{where}: vLLM does not load LoRA biases (bias={config['bias']!r}); use --merge")
    if config["r"] > VLLM_LORA_RANKS[-1]:
        raise UserError(f"{where}: rank {config['r']} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}; "
                        "use --merge")
    supported = VLLM_LORA_MODULES.get(architecture or "")
    targets = config["target_modules"]
    leaves = {t.rsplit(".", 1)[-1] for t in ([targets] if isinstance(targets, str) else targets)}
    if supported is not None and not leaves <= supported:
        raise UserError(f"{where}: vLLM adapts only {', '.join(sorted(supported))} in {architecture}, the adapter "
                        f"also targets {', '.join(sorted(leaves - supported))}; use --merge")
    if supported is None:
        logger.warning("vLLM's LoRA support for %s is not known here: check vLLM's supported-models list, or use "
                       "--merge", architecture or "this architecture")
    return config


def max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank choice vLLM accepts that holds `rank`."""
    return next(choice for choice in VLLM_LORA_RANKS if choice >= rank)


def base_architecture(base: str) -> str | None:
    config_file = Path(base) / "config.json"
    if config_file.is_file():
        return (read_json(config_file).get("architectures") or [None])[0]
    from transformers import AutoConfig  # a hub id: its config (from the cache or the Hub)

    try:
        config = AutoConfig.from_pretrained(base)
    except OSError as err:
        raise UserError(f"model: cannot read the config of base model '{base}' ({str(err).splitlines()[0]}); "
                        "the machine may be offline: use a local base folder (--adapter on MODEL)") from None
    return (getattr(config, "architectures", None) or [None])[0]


def prepare_for_vllm(source: ModelSource, output_dir: str | Path, name: str, merge: bool = False,
                     port: int = 8000, overwrite: bool = False) -> ServePlan:
    """Write the folder vLLM loads under `output_dir` and return the serve command."""
    output_dir = Path(output_dir).resolve()
    if source.gguf_file and not (merge and source.adapter is not None):
        raise UserError(f"model: the base is the GGUF file {source.gguf_file}: serve merged weights (a LoRA run: "
                        "--merge), a full fine-tune's model folder, or the GGUF file itself with `vllm serve FILE`")
    if merge and source.adapter is not None:
        merge_lora(source, output_dir, overwrite=overwrite)
        return ServePlan(output_dir, ["vllm", "serve", str(output_dir), "--served-model-name", name,
                                      "--port", str(port)])
    if source.adapter is None:
        if not Path(source.base).is_dir():
            return ServePlan(Path(source.base), ["vllm", "serve", source.base, "--served-model-name", name,
                                                 "--port", str(port)])
        check_output_dir(output_dir, overwrite)
        shutil.copytree(source.base, output_dir, dirs_exist_ok=True)
        return ServePlan(output_dir, ["vllm", "serve", str(output_dir), "--served-model-name", name,
                                      "--port", str(port)])
    config = check_adapter_for_vllm(source.adapter, base_architecture(source.base))
    check_output_dir(output_dir, overwrite)
    adapter_dir = output_dir / name
    shutil.copytree(source.adapter, adapter_dir, dirs_exist_ok=True)
    base = str(Path(source.base).resolve()) if Path(source.base).is_dir() else source.base
    command = ["vllm", "serve", base, "--enable-lora", "--lora-modules", f"{name}={adapter_dir}",
               "--max-lora-rank", str(max_lora_rank(config["r"])), "--port", str(port)]
    return ServePlan(adapter_dir, command)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None and shutil.which("vllm") is not None

"""Prepare a folder vLLM serves, and the arguments that serve it.

Two layouts: merged or full weights (one plain HF folder: `--model FOLDER`), or the base model plus a LoRA
adapter (`--model BASE --enable-lora --lora-modules NAME=ADAPTER --max-lora-rank R`). An adapter vLLM would
refuse is refused here, before anything is written. What vLLM's LoRA loader accepts comes from the installed
vLLM when it is asked (`serve --run`: automodel/inference/vllm_probe.py runs vLLM's own adapter check,
PEFTHelper.validate_legal, and reads which architectures implement LoRA), otherwise from the table below, which
tests/inference/test_vllm_server.py checks against the installed vLLM. vLLM rejects DoRA, `modules_to_save`,
LoRA biases and initialisations that change the base weights, and ranks above `--max-lora-rank` (one of the
rank choices). It adapts the linear layers of the decoder blocks (packing q/k/v and gate/up, which it handles)
and the embedding modules the model class names (embed_tokens, lm_head).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from automodel.errors import UserError
from automodel.inference.merge import check_output_dir, merge_lora
from automodel.inference.sources import ADAPTER_CONFIG, ModelSource, read_json
from automodel.inference.vllm_runtime import VllmInstall, ask_vllm
from automodel.paths import check_output_folder

logger = logging.getLogger("automodel")

VLLM_VERSION_CHECKED = "0.32.0"  # the vLLM the table below was checked against
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
DECODER_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})
# Architectures whose vLLM implementation supports LoRA, with the module names it adapts: the decoder linears
# and the embedding modules its model class declares (which differ between architectures).
VLLM_LORA_MODULES = {
    "LlamaForCausalLM": DECODER_LINEARS | EMBEDDINGS, "MistralForCausalLM": DECODER_LINEARS,
    "Qwen2ForCausalLM": DECODER_LINEARS, "Qwen3ForCausalLM": DECODER_LINEARS | EMBEDDINGS,
    "GemmaForCausalLM": DECODER_LINEARS, "Gemma2ForCausalLM": DECODER_LINEARS, "Gemma3ForCausalLM": DECODER_LINEARS,
    "Olmo2ForCausalLM": DECODER_LINEARS | {"embed_tokens"}, "GraniteForCausalLM": DECODER_LINEARS | EMBEDDINGS}


@dataclass(frozen=True)
class LoraRules:
    """What vLLM's LoRA loader accepts: rank choices, the modules it adapts per architecture, and who said so."""

    ranks: tuple[int, ...]
    modules: dict[str, frozenset[str]]
    unsupported: frozenset[str]  # architectures vLLM knows but serves without LoRA
    source: str
    adapter_error: str | None = None  # vLLM's own verdict on the adapter, when it was asked

    @classmethod
    def table(cls) -> "LoraRules":
        return cls(VLLM_LORA_RANKS, VLLM_LORA_MODULES, frozenset(), f"automodel's table (vLLM {VLLM_VERSION_CHECKED})")

    @classmethod
    def from_vllm(cls, answer: dict) -> "LoraRules":
        """From automodel/inference/vllm_probe.py's answer."""
        modules, unsupported = {}, set()
        for arch, info in answer["architectures"].items():
            if info.get("supports_lora"):
                packed = {name for names in info["packed_modules"].values() for name in names}
                modules[arch] = DECODER_LINEARS | packed | frozenset(info["embedding_modules"])
            elif info.get("known"):
                unsupported.add(arch)
        return cls(tuple(answer["max_lora_ranks"]), modules, frozenset(unsupported),
                   f"the installed vLLM {answer['version']}", answer.get("adapter_error"))


@dataclass
class ServePlan:
    """The prepared folder and the server arguments that name the model (and adapter) in it."""

    folder: Path
    model_args: list[str]


def check_adapter_for_vllm(adapter: Path, architecture: str | None, rules: LoraRules | None = None) -> dict:
    """adapter_config.json, checked against what vLLM's LoRA loader accepts; returns it."""
    rules = rules or LoraRules.table()
    config = read_json(adapter / ADAPTER_CONFIG)
    where = f"{adapter / ADAPTER_CONFIG}"
    missing = [k for k in ("r", "lora_alpha", "target_modules") if config.get(k) in (None, [], "")]
    if missing:
        raise UserError(f"{where}: vLLM needs {', '.join(missing)}")
    if config.get("use_dora"):
        raise UserError(f"{where}: vLLM does not serve DoRA adapters: merge it first (serve --merge, or merge-lora)")
    if config.get("modules_to_save"):
        raise UserError(f"{where}: vLLM does not load modules_to_save ({config['modules_to_save']}); use --merge")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise UserError(f"{where}: vLLM does not load LoRA biases (bias={config.get('bias')!r}); use --merge")
    if rules.adapter_error:
        raise UserError(f"{where}: {rules.source} refuses it: {rules.adapter_error}; use --merge")
    if config["r"] > rules.ranks[-1]:
        raise UserError(f"{where}: rank {config['r']} is above vLLM's largest --max-lora-rank {rules.ranks[-1]}; "
                        "use --merge")
    if architecture in rules.unsupported:
        raise UserError(f"{where}: {rules.source} serves {architecture} without LoRA support; use --merge")
    supported = rules.modules.get(architecture or "")
    targets = config["target_modules"]
    leaves = {t.rsplit(".", 1)[-1] for t in ([targets] if isinstance(targets, str) else targets)}
    if supported is not None and not leaves <= supported:
        raise UserError(f"{where}: vLLM adapts only {', '.join(sorted(supported))} in {architecture}, the adapter "
                        f"also targets {', '.join(sorted(leaves - supported))}; use --merge")
    if supported is None:
        logger.warning("vLLM's LoRA support for %s is not known here: check vLLM's supported-models list, or use "
                       "--merge", architecture or "this architecture")
    return config


def max_lora_rank(rank: int, ranks: tuple[int, ...] = VLLM_LORA_RANKS) -> int:
    """The smallest --max-lora-rank choice vLLM accepts that holds `rank`."""
    return next(choice for choice in ranks if choice >= rank)


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


def lora_rules(adapter: Path, architecture: str | None, ask: VllmInstall | None) -> LoraRules:
    """The installed vLLM's rules (and verdict on this adapter) when `ask` names it, else the table."""
    if ask is None:
        return LoraRules.table()
    rank = read_json(adapter / ADAPTER_CONFIG).get("r")
    answer = ask_vllm(ask, [architecture] if architecture else [], adapter,
                      max_lora_rank(rank) if isinstance(rank, int) and 0 < rank <= VLLM_LORA_RANKS[-1] else None)
    return LoraRules.from_vllm(answer)


def prepare_for_vllm(source: ModelSource, output_dir: str | Path, name: str, merge: bool = False,
                     overwrite: bool = False, ask: VllmInstall | None = None,
                     trust_remote_code: bool = False) -> ServePlan:
    """Write the folder vLLM loads under `output_dir`; return it with the server's model arguments.

    `ask`: check a LoRA adapter against this installed vLLM rather than the table. `trust_remote_code`: the
    person's --trust-remote-code, for the merge and for vLLM."""
    plan = _prepare(source, output_dir, name, merge, overwrite, ask, trust_remote_code)
    if trust_remote_code:
        plan.model_args.append("--trust-remote-code")
    return plan


def _prepare(source: ModelSource, output_dir: str | Path, name: str, merge: bool, overwrite: bool,
             ask: VllmInstall | None, trust_remote_code: bool) -> ServePlan:
    # As merge-lora's: before resolving, which would follow a link (the files would land where it points).
    check_output_folder(Path(output_dir), "--output", [p for p in (source.adapter, Path(source.base)) if p])
    output_dir = Path(output_dir).resolve()
    if source.gguf_file and not (merge and source.adapter is not None):
        raise UserError(f"model: the base is the GGUF file {source.gguf_file}: serve merged weights (a LoRA run: "
                        "--merge), a full fine-tune's model folder, or the GGUF file itself with `vllm serve FILE`")
    if merge and source.adapter is not None:
        merge_lora(source, output_dir, overwrite=overwrite, trust_remote_code=trust_remote_code)
        return ServePlan(output_dir, ["--model", str(output_dir), "--served-model-name", name])
    if source.adapter is None:
        if not Path(source.base).is_dir():
            return ServePlan(Path(source.base), ["--model", source.base, "--served-model-name", name])
        check_output_dir(output_dir, overwrite)
        shutil.copytree(source.base, output_dir, dirs_exist_ok=True)
        return ServePlan(output_dir, ["--model", str(output_dir), "--served-model-name", name])
    architecture = base_architecture(source.base)
    rules = lora_rules(source.adapter, architecture, ask)
    config = check_adapter_for_vllm(source.adapter, architecture, rules)
    check_output_dir(output_dir, overwrite)
    adapter_dir = output_dir / name
    shutil.copytree(source.adapter, adapter_dir, dirs_exist_ok=True)
    base = str(Path(source.base).resolve()) if Path(source.base).is_dir() else source.base
    return ServePlan(adapter_dir, ["--model", base, "--enable-lora", "--lora-modules", f"{name}={adapter_dir}",
                                   "--max-lora-rank", str(max_lora_rank(config["r"], rules.ranks))])

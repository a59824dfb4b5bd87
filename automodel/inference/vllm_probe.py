"""Ask the installed vLLM what it accepts for LoRA; run by the vLLM venv's interpreter, not imported by automodel.

vLLM lives in a venv of its own (its torch and transformers pins differ from ours), so automodel runs this file
with that interpreter: `python vllm_probe.py '{"architectures": [...], "adapter": PATH, "max_lora_rank": R}'`.
It prints one line, PROBE_PREFIX + JSON: vLLM's version, the --max-lora-rank choices, for each architecture
whether vLLM implements LoRA for it and the module names it packs or embeds, and vLLM's own verdict on the
adapter (PEFTHelper.validate_legal, what the server runs when it loads an adapter). Standard library and vLLM only.
"""

from __future__ import annotations

import json
import sys
import typing

PROBE_PREFIX = "automodel-vllm-probe "


def describe_architecture(registry, arch: str) -> dict:
    from vllm.model_executor.models.interfaces import supports_lora

    registered = registry.models.get(arch)
    if registered is None:
        return {"known": False, "supports_lora": False}
    model_cls = registered.load_model_cls()
    packed = getattr(model_cls, "packed_modules_mapping", {}) or {}
    return {"known": True, "supports_lora": bool(supports_lora(model_cls)),
            "packed_modules": {k: list(v) for k, v in packed.items()},
            "embedding_modules": sorted(getattr(model_cls, "embedding_modules", {}) or {})}


def adapter_verdict(adapter: str, max_lora_rank: int) -> str | None:
    """vLLM's reason for refusing the adapter, or None when it accepts it."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    try:
        PEFTHelper.from_local_dir(adapter, None).validate_legal(LoRAConfig(max_lora_rank=max_lora_rank))
    except ValueError as err:
        return str(err)
    return None


def probe(request: dict) -> dict:
    import vllm
    from vllm.config.lora import MaxLoRARanks
    from vllm.model_executor.models import ModelRegistry

    answer = {"version": vllm.__version__, "max_lora_ranks": list(typing.get_args(MaxLoRARanks)),
              "architectures": {a: describe_architecture(ModelRegistry, a) for a in request.get("architectures", [])}}
    if request.get("adapter"):
        answer["adapter_error"] = adapter_verdict(request["adapter"], request["max_lora_rank"])
    return answer


if __name__ == "__main__":
    print(PROBE_PREFIX + json.dumps(probe(json.loads(sys.argv[1]))), flush=True)

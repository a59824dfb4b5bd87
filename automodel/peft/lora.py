"""LoRA through the maintained `peft` library, with target selection by glob pattern.

We resolve the user's patterns (`*_proj`, exact names, `all-linear`) to module names ourselves so that
zero matches is a clear error listing what the model has, and so the output head is never adapted
unless it is named explicitly. The saved adapter is plain PEFT format: `PeftModel.from_pretrained` loads it.

The variants are peft's own: DoRA (`use_dora`: a learned magnitude per output row on top of the low-rank
direction), rsLoRA (`use_rslora`: scaling alpha / sqrt(r) instead of alpha / r) and the initialisations of
`init_lora_weights` that leave the base weights untouched. QLoRA (`quantization`) loads the frozen base in
4 bits through bitsandbytes; the adapter it trains is an ordinary LoRA adapter for the unquantised base.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from automodel.errors import UserError
from automodel.peft.quantization import QuantizationSettings

logger = logging.getLogger(__name__)


def _adaptable_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2 style projections; peft adapts these too

    return (nn.Linear, Conv1D)


def linear_module_names(model: nn.Module, include_head: bool = False) -> list[str]:
    """Every module LoRA can adapt; the output head only when asked for."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if isinstance(module, _adaptable_types()) and (include_head or module is not head)]


def _matches(name: str, pattern: str) -> bool:
    # A pattern matches the full dotted name or its last part: 'q_proj', '*_proj', 'model.layers.0.*'.
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


@dataclass
class LoraSettings:
    """The `peft` section. `target_modules` takes glob patterns, exact names or 'all-linear'."""

    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] = field(default_factory=list)
    dim: int = 8
    alpha: float = 32
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    quantization: dict[str, Any] | None = None

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"dim (the LoRA rank) must be >= 1, got {self.dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_init(self.init_lora_weights)
        if self.quantization is not None and not isinstance(self.quantization, QuantizationSettings):
            self.quantization = QuantizationSettings.from_config(self.quantization, "peft.quantization")

    def select_modules(self, model: nn.Module) -> list[str]:
        """Full names of the modules to adapt; zero matches is a UserError listing what there is."""
        patterns = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        if "all-linear" in patterns:
            candidates = linear_module_names(model)
            chosen = set(candidates)
        else:
            candidates = linear_module_names(model, include_head=True)
            body = set(linear_module_names(model))
            # A glob never pulls in the output head; naming it exactly ('lm_head') does.
            chosen = {n for n in candidates if any(_matches(n, p) for p in patterns)
                      and (n in body or any(p in (n, n.rsplit(".", 1)[-1]) for p in patterns))}
        chosen = {n for n in chosen if not any(_matches(n, p) for p in self.exclude_modules)}
        if not chosen:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise UserError(f"peft.target_modules: {patterns} (minus exclude_modules {self.exclude_modules}) matched "
                            f"no linear module; this model's linear modules are: {', '.join(leaves)}")
        return sorted(chosen)

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        chosen = self.select_modules(model)
        return LoraConfig(r=self.dim, lora_alpha=self.alpha, lora_dropout=self.dropout, use_rslora=self.use_rslora,
                          use_dora=self.use_dora, init_lora_weights=self.init_lora_weights,
                          target_modules=_compact_targets(model, chosen), bias="none", task_type="CAUSAL_LM")

    def apply(self, model: nn.Module):
        """Wrap `model` with LoRA adapters; only adapter weights stay trainable."""
        from peft import get_peft_model

        from automodel.peft.fused_lora import register_fused_lora

        wanted = {n.rsplit(".", 1)[-1] for n in self.select_modules(model)}
        config = self.peft_config(model)
        if self.quantization is not None:
            model = self.quantization.prepare_for_training(model)
        else:
            register_fused_lora(config)
        peft_model = get_peft_model(model, config)
        adapted = adapted_targets(peft_model)
        if adapted != wanted:
            # peft's transformers-v4 adapter compatibility maps gate_proj/up_proj/down_proj targets of some MoE
            # model types (DeepSeek-V2/V3) to the fused expert parameters too; say what was adapted instead.
            logger.warning("peft adapted %s instead of the selected %s (its MoE target conversion for %s)",
                           sorted(adapted), sorted(wanted), getattr(model.config, "model_type", "this model"))
        return peft_model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Initialisations that leave the base weights as they are, so the saved adapter applies to the original base.
# PiSSA, OLoRA, CorDA and LoftQ move part of the base weights into the adapter (peft can convert the adapter back
# only against a saved copy of the initial model); EVA needs a data pass at init.
INIT_CHOICES = (True, False, "gaussian", "orthogonal")
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


def check_init(init) -> None:
    if isinstance(init, bool) or init in INIT_CHOICES:
        return
    name = str(init)
    if name.startswith(BASE_CHANGING_INITS):
        raise ValueError(f"init_lora_weights: {name!r} changes the base model's weights (or needs a data pass), so "
                         "the saved adapter would not apply to the original base; use one of "
                         f"{', '.join(repr(c) for c in INIT_CHOICES)}")
    raise ValueError(f"init_lora_weights: expected one of {', '.join(repr(c) for c in INIT_CHOICES)}, got {init!r}")


def _compact_targets(model: nn.Module, chosen: list[str]) -> list[str]:
    """Leaf names ('q_proj') when they select exactly `chosen` (the usual adapter_config.json form that
    vLLM and the Hub expect), otherwise the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    by_leaf = {n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return leaves if by_leaf == set(chosen) else chosen


def adapted_targets(model: nn.Module) -> set[str]:
    """What LoRA adapts, by leaf name: 'q_proj' for a module, 'experts.down_proj' for a parameter."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = name.removesuffix(".base_layer").rsplit(".", 1)[-1]
            names.add(f"{owner}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            names.add(name.rsplit(".", 1)[-1])
    return names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


__all__ = ["LoraSettings", "adapted_targets", "count_parameters", "is_peft_model", "linear_module_names"]

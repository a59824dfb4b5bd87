"""The model's top computed only where the loss reads it, the label rows: the output head and the last layer.

1. The output head (the projection to the vocabulary, `lm_head`) and what each causal LM does around it: one
   table. The chunked loss (`head_loss`, automodel/training/loss.py) applies the output head itself, at label
   positions only, so it must reproduce the transformers `...ForCausalLM.forward` exactly. For most architectures
   that is just `lm_head`; the exceptions (checked against transformers 5's modeling code, and by
   tests/models/test_chunked_head.py for every native row) are:

   - Gemma 2 / Gemma 3: final-logit soft-capping, `cap * tanh(logits / cap)` (`config.final_logit_softcapping`).
   - Cohere / Cohere2: `logits * config.logit_scale`.
   - Granite / GraniteMoe / GraniteMoeShared: `logits / config.logits_scaling`.
   - MiniCPM3: `hidden / config.logits_scaling` before the head.
   - Jais (automodel's own class): `logits * config.output_logits_scale` (the published `width_scale`).

   An architecture not in `LOGIT_TRANSFORMS` gets no chunked head: the recipe says so in one log line and computes
   logits at the label positions through the model's own forward (`logits_to_keep`) instead.

2. The last decoder layer at the label rows. The loss reads the last hidden state at the label positions alone, and
   nothing after the last layer's attention mixes positions. So, given `LAST_LAYER_ROWS` (a bool batch x seq mask
   passed through the model's forward as a keyword), the last layer computes only those rows wherever it can
   without changing them: its attention runs those query rows alone (automodel/models/attention.py) and its MLP,
   most of a layer's matmuls, runs on those rows only (`LastLayerRows`, forward hooks on the layer). The other rows
   of the last hidden state are left as garbage that nothing reads; their gradient is zero. The keys and values
   still come from every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from automodel.models.attention import LAST_LAYER_ROWS
from automodel.models.decoder_layers import decoder_layers
from automodel.models.unwrap import transformers_model

# Native class -> {transform: config attribute}. An empty dict: logits = lm_head(hidden), nothing else.
LOGIT_TRANSFORMS: dict[str, dict[str, str]] = {
    **{name: {} for name in (
        "BambaForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Exaone4ForCausalLM",
        "FalconForCausalLM", "GemmaForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM", "GPTBigCodeForCausalLM",
        "GPTJForCausalLM", "GPTNeoXForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
        "NemotronForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "OlmoeForCausalLM", "PhiForCausalLM",
        "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
        "StableLmForCausalLM", "Starcoder2ForCausalLM")},
    "Gemma2ForCausalLM": {"softcap": "final_logit_softcapping"},
    "Gemma3ForCausalLM": {"softcap": "final_logit_softcapping"},
    "CohereForCausalLM": {"logit_scale": "logit_scale"},
    "Cohere2ForCausalLM": {"logit_scale": "logit_scale"},
    "GraniteForCausalLM": {"logit_divisor": "logits_scaling"},
    "GraniteMoeForCausalLM": {"logit_divisor": "logits_scaling"},
    "GraniteMoeSharedForCausalLM": {"logit_divisor": "logits_scaling"},
    "MiniCPM3ForCausalLM": {"hidden_divisor": "logits_scaling"},
    "JaisGPT2LMHeadModel": {"logit_scale": "output_logits_scale"},  # automodel/models/families/jais.py
}


@dataclass(frozen=True)
class OutputHead:
    """`logits = post(module(pre(hidden)))`, in the same operations and order as transformers."""

    module: nn.Module                  # the output projection: lm_head, or the LoRA layer wrapping it
    hidden_divisor: float | None = None
    logit_scale: float | None = None
    logit_divisor: float | None = None
    softcap: float | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_divisor is not None:
            hidden = hidden / self.hidden_divisor
        logits = self.module(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]


def head_class_name(model: nn.Module) -> str:
    """The name under which LOGIT_TRANSFORMS knows the model's head: its own class (FSDP2 replaces the class with an
    `FSDP<Name>` subclass), or the nearest parent in the table when the classes in between inherit `forward`
    (the remote-code families' renamed subclasses, automodel/models/families), which computes the logits."""
    classes = [cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)]
    for cls in classes:
        if cls.__name__ in LOGIT_TRANSFORMS or "forward" in vars(cls):
            return cls.__name__
    return classes[0].__name__


def vocab_sharded_head_unsupported(module: nn.Module) -> str:
    """Why the chunked loss cannot run a head FSDP2 split by vocabulary rows (distributed/vocab_shard.py), or "".
    The loss gathers the split head once (every process together); a module wrapping it (a LoRA adapter on it) would
    be called chunk by chunk, a different number of times on each process."""
    from automodel.distributed.vocab_shard import VocabShardedLinear

    if isinstance(module, VocabShardedLinear):
        return ""
    if any(isinstance(m, VocabShardedLinear) for m in module.modules()):
        return "the output head wraps a head split by vocabulary rows (FSDP2)"
    return ""


def find_output_head(model: nn.Module) -> tuple[OutputHead | None, str]:
    """(the model's output head, "") or (None, why the chunked head cannot be used for it)."""
    base = transformers_model(model)
    name = head_class_name(base)
    if name not in LOGIT_TRANSFORMS:
        return None, f"{name} is not in automodel's output-head table (automodel/models/label_rows.py)"
    module = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(module, nn.Module):
        return None, f"{name} has no output embeddings module"
    values = {key: getattr(base.config, attribute, None) for key, attribute in LOGIT_TRANSFORMS[name].items()}
    why = vocab_sharded_head_unsupported(module)
    if why:
        return None, why
    return OutputHead(module, **{k: float(v) for k, v in values.items() if v is not None}), ""


# ---- the last decoder layer at the label rows ------------------------------------------------------------------

class LastLayerRows:
    """Forward hooks that run the last decoder layer's `mlp` on the `LAST_LAYER_ROWS` rows only.

    The layer's pre-hook reads the rows from the layer's keyword arguments (so an activation-checkpointing
    recompute, which calls the layer again with them, sees the same rows); the MLP's hooks gather those rows
    before it and scatter its output back into zeros after it."""

    def __init__(self, layer: nn.Module):
        self.rows: torch.Tensor | None = None
        self.handles = [layer.register_forward_pre_hook(self._read_rows, with_kwargs=True),
                        layer.mlp.register_forward_pre_hook(self._gather),
                        layer.mlp.register_forward_hook(self._scatter)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _read_rows(self, module, args, kwargs):
        self.rows = kwargs.get(LAST_LAYER_ROWS)

    def _gather(self, module, args):
        (hidden,) = args
        if self.rows is None or hidden.shape[:-1] != self.rows.shape:
            self.rows = None  # not this forward's rows: compute every row
            return None
        return (hidden[self.rows].unsqueeze(0),)

    def _scatter(self, module, args, output):
        if self.rows is None:
            return None
        full = output.new_zeros(*self.rows.shape, output.shape[-1])
        full[self.rows] = output[0]
        return full


def install_last_layer_rows(model: nn.Module) -> LastLayerRows | None:
    """Install `LastLayerRows` on the model's last decoder layer when it has a per-token `mlp`; None otherwise."""
    layer = decoder_layers(model)[-1]
    return LastLayerRows(layer) if isinstance(getattr(layer, "mlp", None), nn.Module) else None

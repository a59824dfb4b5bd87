"""One micro-batch -> (summed loss, label tokens): the forward path of training and validation, in one place.

`ForwardLoss(model, loss_fn)` decides once, from the model and the loss, which of these optimisations apply (the
start banner's `loss` row prints `describe()`); calling it on a micro-batch applies them, in this order:

1. Logits only at label positions (transformers' boolean `logits_to_keep`): on answer-only data few positions carry
   a label, and the output head is a large share of the FLOPs.
2. The last decoder layer only at the label rows (automodel/models/last_layer_rows.py): the loss reads no other row
   of the last hidden state, and nothing after the last layer's attention mixes positions.
3. The chunked output head (`loss_fn.head_loss`, automodel/training/loss.py): the model's forward computes no
   logits; the head (automodel/models/output_head.py) and the cross-entropy run a chunk of label tokens at a time,
   so no `[label tokens x vocab]` logits tensor exists.

Plus, in training, the mixture-of-experts router auxiliary loss (automodel/models/router_aux_loss.py), which
transformers adds only to the loss it computes itself. Where a model or loss cannot take an optimisation, the
forward does without it and the banner's `loss` row says so (with one log line naming the reason).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from automodel.batch import IGNORE_INDEX, count_label_tokens, model_inputs, shift_labels
from automodel.models.attention import LAST_LAYER_ROWS
from automodel.models.capabilities import last_layer_rows_supported
from automodel.models.last_layer_rows import install_last_layer_rows
from automodel.models.output_head import OutputHead, find_output_head
from automodel.models.router_aux_loss import RouterAuxLoss
from automodel.models.unwrap import transformers_model, without_ddp

logger = logging.getLogger("automodel")


def supports_label_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do, including a boolean
    [batch, seq] mask), so logits need not be computed where no label is."""
    return "logits_to_keep" in inspect.signature(transformers_model(model).forward).parameters


def chunked_head_for(model: nn.Module, loss_fn) -> OutputHead | None:
    """The output head the chunked loss applies, or None when the forward computes logits through the model's forward
    instead: `loss_fn` has no `chunk_size` (or it is null: the user's choice), or (logged) the architecture is not
    in the output-head table."""
    if not getattr(loss_fn, "chunk_size", None) or not hasattr(loss_fn, "head_loss"):
        return None
    if _overrides_call_only(type(loss_fn)):
        logger.info("chunked output head off: %s overrides __call__ but not head_loss; computing logits at the "
                    "label positions with logits_to_keep", type(loss_fn).__name__)
        return None
    head, why = find_output_head(model)
    if head is None:
        logger.info("chunked output head off: %s; computing logits at the label positions with logits_to_keep", why)
    return head


def _overrides_call_only(loss_class: type) -> bool:
    """A subclass of a chunk-capable loss that changed what `__call__` computes but not `head_loss`: the chunked path
    would silently skip the user's loss."""
    call_owner = next(c for c in loss_class.__mro__ if "__call__" in vars(c))
    head_owner = next(c for c in loss_class.__mro__ if "head_loss" in vars(c))
    return call_owner is not head_owner and issubclass(call_owner, head_owner)


def forward_chunked_loss(model: nn.Module, head: OutputHead, loss_fn, batch: dict[str, torch.Tensor],
                         targets: torch.Tensor, keep: torch.Tensor, **forward_kwargs):
    """(summed cross-entropy over the label positions `keep`, the model's output). The model's forward computes
    no logits (an all-False `logits_to_keep`); the head runs on the last hidden state at `keep`."""
    output = model(**model_inputs(batch), use_cache=False, logits_to_keep=torch.zeros_like(keep),
                   output_hidden_states=True, **forward_kwargs)
    hidden = output.hidden_states[-1][keep]
    return loss_fn.head_loss(head, hidden, targets[keep]), output


class ForwardLoss:
    """The model's forward and the loss of one micro-batch, with the optimisations that apply to this model and loss
    (the module docstring lists them). `model` is the training model (DDP, FSDP2, TP, peft: any wrapping)."""

    def __init__(self, model: nn.Module, loss_fn):
        self.model, self.loss_fn = model, loss_fn
        self.router_aux = RouterAuxLoss(without_ddp(model))
        base = transformers_model(model)
        self.label_logits_only = supports_label_logits(base)
        if not self.label_logits_only:
            logger.info("%s.forward takes no logits_to_keep: computing logits at every position", type(base).__name__)
        # The router would still route (and count in its load-balancing loss) the rows the last layer skips.
        self.last_layer_rows = (self.label_logits_only and not self.router_aux.enabled
                                and last_layer_rows_supported(base.config))
        if self.last_layer_rows:
            install_last_layer_rows(model)
        self.output_head = chunked_head_for(base, loss_fn) if self.label_logits_only else None

    def describe(self) -> str:
        """The optimisations in effect, in the order the forward applies them."""
        if not self.label_logits_only:
            return "logits at every position"
        parts = ["logits at label positions only"]
        if self.output_head is not None:
            parts.append(f"chunked output head ({self.loss_fn.chunk_size} label tokens a chunk)")
        if self.last_layer_rows:
            parts.append("last layer on label rows")
        return ", ".join(parts)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed loss, label tokens) of one micro-batch on the model's device; the router aux term is added in
        training only (validation reports pure cross-entropy)."""
        targets = shift_labels(batch["labels"])
        keep = targets != IGNORE_INDEX
        rows = {LAST_LAYER_ROWS: keep} if self.last_layer_rows else {}
        if self.output_head is not None:
            summed, output = forward_chunked_loss(self.model, self.output_head, self.loss_fn, batch, targets, keep,
                                                  **rows)
        else:
            # No KV cache while training (it only costs memory); the saved config keeps the model's own setting.
            kwargs = {"logits_to_keep": keep, **rows} if self.label_logits_only else {}
            output = self.model(**model_inputs(batch), use_cache=False, **kwargs)
            summed = self.loss_fn(output.logits, targets[keep] if self.label_logits_only else targets)
        if self.model.training:
            summed = self.router_aux.add(summed, output, batch["labels"])
        return summed, count_label_tokens(batch["labels"])

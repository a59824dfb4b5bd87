"""How the training forward runs for one model and loss: decided once, right after the model is built.

`plan_forward(model, loss_fn)` (called from the recipe's setup) decides which of these optimisations apply, installs
the hooks the second one needs on the model, and returns the `ForwardPlan` that training/loss.py `ForwardLoss`
runs on every micro-batch, in this order:

1. Logits only at label positions (transformers' boolean `logits_to_keep`): on answer-only data few positions carry
   a label, and the output head is a large share of the FLOPs.
2. The last decoder layer only at the label rows (automodel/models/label_rows.py): the loss reads no other row
   of the last hidden state, and nothing after the last layer's attention mixes positions.
3. The chunked output head (`loss_fn.head_loss`, automodel/training/loss.py): the model's forward computes no
   logits; the head (automodel/models/label_rows.py) and the cross-entropy run a chunk of label tokens at a time,
   so no `[label tokens x vocab]` logits tensor exists.

Plus, in training, the mixture-of-experts router auxiliary loss (automodel/models/router_aux_loss.py), which
transformers adds only to the loss it computes itself: planned only for a model whose config enables it. Where a
model or loss cannot take an optimisation, the forward does without it and the plan's `describe()` (the start
banner's `loss` row) says so, with one log line naming the reason. The loss is duck-typed (a `chunk_size` and a `head_loss`): models/ imports nothing of training/.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

from torch import nn

from automodel.models.capabilities import last_layer_rows_supported
from automodel.models.label_rows import LastLayerRows, OutputHead, find_output_head, install_last_layer_rows
from automodel.models.router_aux_loss import RouterAuxLoss, router_aux_loss
from automodel.models.unwrap import transformers_model, without_ddp

logger = logging.getLogger("automodel")


@dataclass
class ForwardPlan:
    """The optimisations the forward of one model and loss applies (the module docstring lists them)."""

    label_logits_only: bool
    last_layer_rows: bool
    output_head: OutputHead | None       # None: logits through the model's forward
    chunk_size: int | None               # label tokens a chunk of the output head (with `output_head`)
    router_aux: RouterAuxLoss | None     # None: the model's config computes no router auxiliary loss
    row_hooks: LastLayerRows | None = None  # installed on the last decoder layer when `last_layer_rows`

    def describe(self) -> str:
        """The optimisations in effect, in the order the forward applies them."""
        if not self.label_logits_only:
            return "logits at every position"
        parts = ["logits at label positions only"]
        if self.output_head is not None:
            parts.append(f"chunked output head ({self.chunk_size} label tokens a chunk)")
        if self.last_layer_rows:
            parts.append("last layer on label rows")
        return ", ".join(parts)


def plan_forward(model: nn.Module, loss_fn) -> ForwardPlan:
    """Decide the forward of `model` (the training model: DDP, FSDP2, TP, peft, any wrapping) with `loss_fn`, and
    install the last layer's row hooks when that optimisation applies."""
    router_aux = router_aux_loss(without_ddp(model))
    base = transformers_model(model)
    label_logits_only = supports_label_logits(base)
    if not label_logits_only:
        logger.info("%s.forward takes no logits_to_keep: computing logits at every position", type(base).__name__)
    # The router would still route (and count in its load-balancing loss) the rows the last layer skips.
    last_layer_rows = label_logits_only and router_aux is None and last_layer_rows_supported(base.config)
    row_hooks = install_last_layer_rows(model) if last_layer_rows else None
    output_head = chunked_head_for(base, loss_fn) if label_logits_only else None
    return ForwardPlan(label_logits_only, last_layer_rows, output_head,
                       loss_fn.chunk_size if output_head is not None else None, router_aux, row_hooks)


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

"""One micro-batch -> (summed loss, label tokens): the forward path of training and validation, in one place.

`ForwardLoss(model, loss_fn, plan)` runs the `ForwardPlan` that automodel/models/forward_plan.py `plan_forward`
decided (and whose hooks it installed) right after the model was built: logits only at label positions, the last
decoder layer only at the label rows, the chunked output head, and in training the router auxiliary loss. It
decides nothing itself.
"""

from __future__ import annotations

import torch
from torch import nn

from automodel.batch import IGNORE_INDEX, count_label_tokens, model_inputs, shift_labels
from automodel.models.attention import LAST_LAYER_ROWS
from automodel.models.forward_plan import ForwardPlan
from automodel.models.output_head import OutputHead


def forward_chunked_loss(model: nn.Module, head: OutputHead, loss_fn, batch: dict[str, torch.Tensor],
                         targets: torch.Tensor, keep: torch.Tensor, **forward_kwargs):
    """(summed cross-entropy over the label positions `keep`, the model's output). The model's forward computes
    no logits (an all-False `logits_to_keep`); the head runs on the last hidden state at `keep`."""
    hidden, output = label_hidden_states(model, batch, keep, **forward_kwargs)
    return loss_fn.head_loss(head, hidden, targets[keep]), output


def label_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor, **forward_kwargs):
    """(the last hidden state at the label positions `keep`, `[label tokens, hidden]`; the model's output). The
    model's forward computes no logits (an all-False `logits_to_keep`)."""
    output = model(**model_inputs(batch), use_cache=False, logits_to_keep=torch.zeros_like(keep),
                   output_hidden_states=True, **forward_kwargs)
    return output.hidden_states[-1][keep], output


class ForwardLoss:
    """The model's forward and the loss of one micro-batch, as `plan` says (automodel/models/forward_plan.py).
    `model` is the training model (DDP, FSDP2, TP, peft: any wrapping)."""

    def __init__(self, model: nn.Module, loss_fn, plan: ForwardPlan):
        self.model, self.loss_fn, self.plan = model, loss_fn, plan
        self.label_logits_only, self.last_layer_rows = plan.label_logits_only, plan.last_layer_rows
        self.output_head, self.router_aux = plan.output_head, plan.router_aux

    def describe(self) -> str:
        """The start banner's `loss` row: the plan's optimisations, in the order the forward applies them."""
        return self.plan.describe()

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
        if self.router_aux is not None and self.model.training:
            summed = self.router_aux.add(summed, output, batch["labels"])
        return summed, count_label_tokens(batch["labels"])

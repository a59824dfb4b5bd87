"""One micro-batch -> (summed loss, label tokens), and the loss it sums: masked next-token cross-entropy.

`ForwardLoss(model, loss_fn, plan)` is the forward path of training and validation, in one place. It runs the
`ForwardPlan` that automodel/models/forward_plan.py `plan_forward` decided (and whose hooks it installed) right after
the model was built: logits only at label positions, the last decoder layer only at the label rows, the chunked
output head, and in training the router auxiliary loss where the model has one. It decides nothing itself.

`MaskedCrossEntropy` is the default `loss_fn`. The recipe divides its sum by the label-token count of the whole
optimizer step (all micro-batches, all ranks), so gradient accumulation and data parallelism give the gradient of one
large batch. A loss function takes `(logits, targets)` already aligned: targets are the labels shifted by one
(`automodel.batch.shift_labels`), and when the model computed logits only at label positions, just those targets.
`head_loss` takes the last hidden states at the label positions instead and applies the output head
(automodel/models/label_rows.py) and the cross-entropy `chunk_size` label tokens at a time: each chunk's gradients
(for the hidden states and the head's trainable parameters) are computed right away and its logits freed, so at most
one chunk's `[chunk_size x vocab]` logits exist at any time, and the head costs 3 matmuls per chunk as unchunked
(no recomputation in backward).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from automodel.batch import IGNORE_INDEX, count_label_tokens, model_inputs, shift_labels
from automodel.errors import UserError
from automodel.models.attention import LAST_LAYER_ROWS
from automodel.models.forward_plan import ForwardPlan
from automodel.models.label_rows import OutputHead

DEFAULT_CHUNK_SIZE = 1024


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the softmax in fp32, or fp64 where the model runs in fp64 (never narrowed)."""
    return logits if logits.dtype == torch.float64 else logits.float()


class MaskedCrossEntropy:
    """Sum of cross-entropy over targets that are not -100, computed in fp32 (fp64 for an fp64 model). `logits` is
    `[..., vocab]`, `targets` the matching `[...]`.

    `chunk_size` (label tokens, default 1024): the recipe applies the output head and this loss at the label
    positions only, that many label tokens at a time, so no `[label_tokens x vocab]` logits tensor ever exists
    (`head_loss`, `ForwardLoss` below). `null` computes the label positions' logits in one piece through
    the model's forward (`logits_to_keep`)."""

    def __init__(self, chunk_size: int | None = DEFAULT_CHUNK_SIZE):
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise UserError(f"loss_fn.chunk_size: expected a positive number of label tokens or null, "
                            f"got {chunk_size!r}")
        self.chunk_size = chunk_size

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = targets != IGNORE_INDEX
        return F.cross_entropy(at_least_fp32(logits[mask]), targets[mask], reduction="sum")

    def head_loss(self, head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The same sum from the last hidden states at the label positions (`[label_tokens, hidden]`, every target a
        label): the output head applied `chunk_size` rows at a time."""
        return chunked_head_cross_entropy(head, hidden, targets, self.chunk_size)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `head(hidden)` against `targets`; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_size, *params):
        wrt_hidden = hidden.requires_grad
        hidden_grads, param_grads = [], [None] * len(params)
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, len(hidden), chunk_size):
            chunk = hidden[start:start + chunk_size].detach().requires_grad_(wrt_hidden)
            with torch.enable_grad():
                loss = F.cross_entropy(at_least_fp32(head(chunk)), targets[start:start + chunk_size],
                                       reduction="sum")
            grads = torch.autograd.grad(loss, [chunk] * wrt_hidden + list(params), allow_unused=True)
            if wrt_hidden:
                hidden_grads.append(grads[0])
            param_grads = [_accumulate(total_grad, grad) for total_grad, grad in zip(param_grads, grads[wrt_hidden:])]
            total += loss.detach()
        # Every trainable head parameter gets a gradient, zero when no label reached it (DDP expects one).
        param_grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(param_grads, params)]
        hidden_grad = (torch.cat(hidden_grads) if hidden_grads else torch.zeros_like(hidden)) if wrt_hidden else None
        ctx.save_for_backward(hidden_grad, *param_grads)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        scaled = [g * grad_output if g is not None else None for g in ctx.saved_tensors]
        return scaled[0], None, None, None, *scaled[1:]


def _accumulate(total: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None:
        return total
    return grad if total is None else total.add_(grad)


def chunked_head_cross_entropy(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor,
                               chunk_size: int) -> torch.Tensor:
    """Sum over rows of cross-entropy(head(hidden[i]), targets[i]), in fp32 (fp64 for fp64 `hidden`); `hidden` is
    `[label_tokens, hidden]`. A head split by vocabulary rows over the processes (FSDP2's frozen head) is gathered
    once for all chunks (every process calls this once per micro-batch; their chunk counts differ)."""
    from automodel.distributed.vocab_shard import VocabShardedLinear

    if isinstance(head.module, VocabShardedLinear):
        head = dataclasses.replace(head, module=head.module.whole())
    params = head.trainable_parameters() if torch.is_grad_enabled() else []
    if not (torch.is_grad_enabled() and (hidden.requires_grad or params)):
        with torch.no_grad():
            return sum((F.cross_entropy(at_least_fp32(head(hidden[start:start + chunk_size])),
                                        targets[start:start + chunk_size], reduction="sum")
                        for start in range(0, len(hidden), chunk_size)),
                       torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device))
    return _ChunkedHeadCrossEntropy.apply(hidden, targets, head, chunk_size, *params)


# ---- the micro-batch's forward ------------------------------------------------------------------------------

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

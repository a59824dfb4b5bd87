"""Output head + cross-entropy at label positions only, a chunk of label tokens at a time.

The model's own forward (DDP's and FSDP2's root forward, peft's, transformers') runs once with an empty
`logits_to_keep` mask and `output_hidden_states=True`; the last hidden state at the label positions (after the
shift) then goes through the output head (automodel/models/heads.py) and an fp32 cross-entropy, `chunk_size` label
tokens at a time. Each chunk's gradients (for the hidden states and the head's trainable parameters) are computed
right away and its logits freed, so at most one chunk's `[chunk_size x vocab]` logits exist at any time, and the
head costs 3 matmuls per chunk as in the unchunked path (no recomputation in backward).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from automodel.data.collate import model_inputs
from automodel.models.heads import OutputHead, output_head
from automodel.training.loss import at_least_fp32

logger = logging.getLogger("automodel")


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
    `[label_tokens, hidden]`."""
    params = head.trainable_parameters() if torch.is_grad_enabled() else []
    if not (torch.is_grad_enabled() and (hidden.requires_grad or params)):
        with torch.no_grad():
            return sum((F.cross_entropy(at_least_fp32(head(hidden[start:start + chunk_size])),
                                        targets[start:start + chunk_size], reduction="sum")
                        for start in range(0, len(hidden), chunk_size)),
                       torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device))
    return _ChunkedHeadCrossEntropy.apply(hidden, targets, head, chunk_size, *params)


def chunked_head_for(model: torch.nn.Module, loss_fn) -> OutputHead | None:
    """The output head the chunked loss applies, or None when the recipe computes logits through the model's forward
    instead: `loss_fn` has no `chunk_size` (or it is null: the user's choice), or (logged) the architecture is not
    in the head table."""
    if not getattr(loss_fn, "chunk_size", None) or not hasattr(loss_fn, "head_loss"):
        return None
    if _overrides_call_only(type(loss_fn)):
        logger.info("chunked output head off: %s overrides __call__ but not head_loss; computing logits at the "
                    "label positions with logits_to_keep", type(loss_fn).__name__)
        return None
    head, why = output_head(model)
    if head is None:
        logger.info("chunked output head off: %s; computing logits at the label positions with logits_to_keep", why)
    return head


def _overrides_call_only(loss_class: type) -> bool:
    """A subclass of a chunk-capable loss that changed what `__call__` computes but not `head_loss`: the chunked path
    would silently skip the user's loss."""
    call_owner = next(c for c in loss_class.__mro__ if "__call__" in vars(c))
    head_owner = next(c for c in loss_class.__mro__ if "head_loss" in vars(c))
    return call_owner is not head_owner and issubclass(call_owner, head_owner)


def forward_chunked_loss(model: torch.nn.Module, head: OutputHead, loss_fn, batch: dict[str, torch.Tensor],
                         targets: torch.Tensor, keep: torch.Tensor, **forward_kwargs):
    """(summed cross-entropy over the label positions `keep`, the model's output). The model's forward computes
    no logits (an all-False `logits_to_keep`); the head runs on the last hidden state at `keep`."""
    output = model(**model_inputs(batch), use_cache=False, logits_to_keep=torch.zeros_like(keep),
                   output_hidden_states=True, **forward_kwargs)
    hidden = output.hidden_states[-1][keep]
    return loss_fn.head_loss(head, hidden, targets[keep]), output

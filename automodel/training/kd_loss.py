"""The knowledge-distillation loss (`kd_loss_fn`), computed with the cross-entropy from the same chunk of logits.

KD term, per label token: T^2 x KL(p_teacher || p_student), p = softmax(logits / T). This is the forward KL, the
direction of Hinton et al. (2015) and of NeMo AutoModel's `KDLoss`: it equals the cross-entropy of the student against
the teacher's soft targets minus the teacher's (constant) entropy, so its gradient with respect to the student's
logits is (p_student - p_teacher) / T, the soft-target analogue of cross-entropy's, and the student is pushed to put
mass wherever the teacher does (mean-seeking), which is what a student trained on the same answers needs; the
reverse KL (mode-seeking) would let it ignore the teacher's second choices. T^2 keeps that gradient's size
independent of T. The KD term is summed over label tokens like the cross-entropy, so the recipe's division by the
step's label tokens gives (1 - kd_ratio) x mean CE + kd_ratio x mean KD.

Both models' logits exist one chunk of `chunk_size` label tokens at a time and only at label positions, as in the
chunked cross-entropy (automodel/training/loss.py): the student's gradient for the chunk is computed at once and the
chunk's logits freed; the teacher's logits are computed under no_grad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from automodel.batch import IGNORE_INDEX
from automodel.errors import UserError
from automodel.models.label_rows import OutputHead
from automodel.training.loss import DEFAULT_CHUNK_SIZE, _accumulate, at_least_fp32


class KDLoss:
    """The `kd_loss_fn` section: `temperature` (> 0), `chunk_size` (label tokens per chunk of both output heads).
    `ignore_index` and `fp32_upcast` are accepted with their only values here (-100, the data's marker; true: the
    softmaxes always run in fp32, fp64 for an fp64 model), so NeMo AutoModel configs read the same."""

    def __init__(self, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 ignore_index: int = IGNORE_INDEX, fp32_upcast: bool = True):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise UserError(f"kd_loss_fn.temperature: expected a number > 0, got {temperature!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise UserError(f"kd_loss_fn.chunk_size: expected a positive number of label tokens, got {chunk_size!r}")
        if ignore_index != IGNORE_INDEX:
            raise UserError(f"kd_loss_fn.ignore_index: the data marks unlabelled positions with {IGNORE_INDEX}, "
                            f"got {ignore_index!r}")
        if fp32_upcast is not True:
            raise UserError(f"kd_loss_fn.fp32_upcast: the softmaxes always run in fp32 here; got {fp32_upcast!r}")
        self.temperature, self.chunk_size = float(temperature), chunk_size

    def kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Sum over rows of T^2 x KL(softmax(teacher / T) || softmax(student / T)); `[rows, vocab]` each."""
        t = self.temperature
        student = F.log_softmax(at_least_fp32(student_logits) / t, dim=-1)
        teacher = F.log_softmax(at_least_fp32(teacher_logits) / t, dim=-1)
        return F.kl_div(student, teacher.to(student.dtype), reduction="sum", log_target=True) * (t * t)


class _ChunkedHeadDistillation(torch.autograd.Function):
    """ce_weight x CE + kd_weight x KD over the label rows, gradients computed chunk by chunk in forward. Returns
    (that weighted sum, the CE sum, the KD sum); only the first carries a gradient."""

    @staticmethod
    def forward(ctx, hidden, targets, teacher_hidden, head, teacher_head, kd_loss, weights, *params):
        ce_weight, kd_weight = weights
        wrt_hidden = hidden.requires_grad
        hidden_grads, param_grads = [], [None] * len(params)
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        totals = torch.zeros(3, dtype=dtype, device=hidden.device)
        size = kd_loss.chunk_size
        for start in range(0, len(hidden), size):
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_hidden[start:start + size])
            chunk = hidden[start:start + size].detach().requires_grad_(wrt_hidden)
            with torch.enable_grad():
                logits = head(chunk)
                ce = F.cross_entropy(at_least_fp32(logits), targets[start:start + size], reduction="sum")
                kd = kd_loss.kl(logits, teacher_logits)
                loss = ce_weight * ce + kd_weight * kd
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, [chunk] * wrt_hidden + list(params), allow_unused=True)
                if wrt_hidden:
                    hidden_grads.append(grads[0])
                param_grads = [_accumulate(total, grad) for total, grad in zip(param_grads, grads[wrt_hidden:])]
            totals += torch.stack([loss.detach(), ce.detach(), kd.detach()]).to(dtype)
        param_grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(param_grads, params)]
        hidden_grad = (torch.cat(hidden_grads) if hidden_grads else torch.zeros_like(hidden)) if wrt_hidden else None
        ctx.save_for_backward(hidden_grad, *param_grads)
        weighted, ce_sum, kd_sum = totals.unbind()
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return weighted, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_output, _ce_grad, _kd_grad):
        scaled = [g * grad_output if g is not None else None for g in ctx.saved_tensors]
        return scaled[0], None, None, None, None, None, None, *scaled[1:]


def chunked_head_distillation(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor,
                              teacher_head: OutputHead, teacher_hidden: torch.Tensor, kd_loss: KDLoss,
                              kd_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """((1 - kd_ratio) x CE + kd_ratio x KD, CE, KD), each summed over the label rows. `hidden` / `teacher_hidden`:
    the two models' last hidden states at the label positions (`[label_tokens, hidden]`), `targets` their labels."""
    params = head.trainable_parameters() if torch.is_grad_enabled() else []
    weights = (1.0 - kd_ratio, kd_ratio)
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _ChunkedHeadDistillation.apply(hidden, targets, teacher_hidden, head, teacher_head, kd_loss, weights,
                                              *params)
    with torch.no_grad():  # validation: the same sums, no gradient
        totals = torch.zeros(3, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, len(hidden), kd_loss.chunk_size):
            rows = slice(start, start + kd_loss.chunk_size)
            logits, teacher_logits = head(hidden[rows]), teacher_head(teacher_hidden[rows])
            ce = F.cross_entropy(at_least_fp32(logits), targets[rows], reduction="sum")
            kd = kd_loss.kl(logits, teacher_logits)
            totals += torch.stack([weights[0] * ce + weights[1] * kd, ce, kd]).to(totals.dtype)
        return tuple(totals.unbind())

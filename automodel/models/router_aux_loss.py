"""The mixture-of-experts router auxiliary (load-balancing) loss, which the recipe adds to its own loss."""

from __future__ import annotations

import torch

from automodel.batch import count_label_tokens
from automodel.errors import UserError


class RouterAuxLoss:
    """Adds `router_aux_loss_coef * aux_loss` to the training loss of MoE models whose config enables
    `output_router_logits` (set it with `model.output_router_logits: true`; the coefficient is the model
    config's `router_aux_loss_coef`, overridable the same way).

    transformers computes the load-balancing loss (Switch-Transformer style, padding masked out) in the forward
    pass but adds it only to the loss it computes from `labels`; the recipe computes its own loss, so it adds the
    term here. The recipe's micro-batch loss is a sum over label tokens that is later divided by the step's label
    tokens, so the aux term is weighted by the micro-batch's label tokens: the step then optimises
    cross-entropy + coef x (token-weighted mean aux loss), whatever the accumulation.
    """

    def __init__(self, model: torch.nn.Module):
        config = model.config
        self.coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
        self.architecture = type(model).__name__
        self._weighted_sum, self._tokens = 0.0, 0
        if not hasattr(config, "router_aux_loss_coef"):
            raise self._unsupported()

    def _unsupported(self) -> UserError:
        return UserError(f"model.output_router_logits: {self.architecture} computes no router auxiliary loss; "
                         "remove the key (only mixture-of-experts models with a load-balancing loss have one)")

    def add(self, summed_loss: torch.Tensor, output, labels: torch.Tensor) -> torch.Tensor:
        """`summed_loss` plus the weighted aux term (training only; validation reports pure cross-entropy)."""
        aux = getattr(output, "aux_loss", None)
        if aux is None:
            raise self._unsupported()
        tokens = count_label_tokens(labels)
        self._weighted_sum += float(aux.detach()) * tokens
        self._tokens += tokens
        return summed_loss + self.coef * aux.to(summed_loss.dtype) * tokens

    def pop_metrics(self) -> dict[str, float]:
        """The token-weighted mean aux loss since the last call (before the coefficient), for the step record."""
        mean = self._weighted_sum / max(self._tokens, 1)
        self._weighted_sum, self._tokens = 0.0, 0
        return {"router_aux_loss": mean, "router_aux_loss_coef": self.coef}


def router_aux_loss(model: torch.nn.Module) -> RouterAuxLoss | None:
    """The router auxiliary loss the training step adds for `model`, or None when its config does not enable
    `output_router_logits` (every dense model): decided once, when the forward is planned, so that the step of a
    model without the loss never asks about it."""
    return RouterAuxLoss(model) if getattr(model.config, "output_router_logits", False) else None

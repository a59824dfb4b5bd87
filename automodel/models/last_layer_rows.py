"""The last decoder layer computed only at the label rows, the rows the loss reads.

The loss reads the last hidden state at the label positions alone, and nothing after the last layer's attention
mixes positions. So, given `LAST_LAYER_ROWS` (a bool batch x seq mask passed through the model's forward as a
keyword), the last layer computes only those rows wherever it can without changing them: its attention runs those
query rows alone (automodel/models/attention.py) and its MLP, most of a layer's matmuls, runs on those rows only
(`LastLayerRows`, forward hooks on the layer). The other rows of the last hidden state are left as garbage that
nothing reads; their gradient is zero. The keys and values still come from every position.
"""

from __future__ import annotations

import torch
from torch import nn

from automodel.models.attention import LAST_LAYER_ROWS
from automodel.models.decoder_layers import decoder_layers


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

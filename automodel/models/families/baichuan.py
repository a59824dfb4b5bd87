"""Baichuan (model_type baichuan): Baichuan-7B (`BaiChuanForCausalLM`) and Baichuan2-7B (`BaichuanForCausalLM`).

Both are the Llama decoder (rotary, RMSNorm, SwiGLU) whose checkpoints store q, k and v as one `self_attn.W_pack`
(rows q, then k, then v; as many key/value heads as query heads, so three equal chunks), split and re-fused by the
conversion of automodel/models/families/conversions.py.

Baichuan2 adds one thing: its output head normalises each vocabulary row to unit L2 norm before the matmul
(logits = h @ normalize(W).T), in training and inference alike (Baichuan 2 technical report, "NormHead"). Its own
code normalises the stored weight in place the first time it runs in eval mode; the math is the same, and here the
stored weight is never changed, so a saved head is the trained tensor as is.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F
from transformers import LlamaForCausalLM


class NormHead(nn.Linear):
    """A bias-free linear layer whose weight rows are L2-normalised at every call."""

    def forward(self, hidden_states):
        return F.linear(hidden_states, F.normalize(self.weight, dim=-1))


class BaichuanLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM (its weights converted from W_pack), with Baichuan2's NormHead when
    `config.baichuan_norm_head` (set by automodel/models/families/configs.py from the published config)."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "baichuan_norm_head", False):
            self.lm_head = NormHead(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

"""LlamaForCausalLM (its head, loss and generation) around a family's own decoder whose attention takes a mask over
the scores: Phi-3-Small's block-sparse layout (phi3small.py), Baichuan-13B's ALiBi bias (baichuan.py)."""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel


class ScoreMaskedLlamaForCausalLM(LlamaForCausalLM):
    """Subclasses name their decoder (`decoder_class`, built from the config) and may replace `output_head`."""

    decoder_class: type[nn.Module]
    # A mask over the scores is what flash and flex attention (and kernel backends) do not take: transformers
    # refuses them at load.
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = self.decoder_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = self.output_head(config)
        self.post_init()

    def output_head(self, config) -> nn.Module:
        return nn.Linear(config.hidden_size, config.vocab_size, bias=False)

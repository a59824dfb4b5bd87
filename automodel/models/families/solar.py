"""Solar Pro (`SolarForCausalLM`, model_type solar): the Mistral decoder (Llama's layers and weight names, rotary,
grouped-query attention, `sliding_window`) with block skip connections between layers.

Its config lists layer indices in `bskcn_1` .. `bskcn_4` and two weights in `bskcn_tv`. Before layer i runs:
- if i is in `bskcn_1` (`bskcn_2`), the hidden state entering layer i is kept as the first (second) skip state;
- then, if i is in `bskcn_3` (`bskcn_4`), the hidden state entering layer i becomes
  `w * first (second) skip state + (1 - w) * hidden state`.
`w` is `bskcn_tv[0]` while the module trains and `bskcn_tv[1]` in inference (module.training selects it), as in
the published modeling code. Keeping happens before blending, so a layer in both lists keeps its unblended input.
No transformers class blends layers, so this is a small native module: MistralForCausalLM whose decoder loop blends.
"""

from __future__ import annotations

import torch
from transformers import MistralForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.mistral.modeling_mistral import MistralModel
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from automodel.models.families.decoder_inputs import decoder_inputs


class SolarModel(MistralModel):
    """MistralModel whose layers' inputs are kept and blended as `bskcn_*` say (module docstring)."""

    def blend_weight(self) -> float:
        train_weight, inference_weight = self.config.bskcn_tv
        return train_weight if self.training else inference_weight

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        inputs_embeds, cache, position_ids, _ = decoder_inputs(self, input_ids, inputs_embeds, cache, use_cache,
                                                               position_ids)
        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    cache=cache, position_ids=position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        weight = self.blend_weight()
        kept: list[torch.Tensor | None] = [None, None]
        keep_at = [set(self.config.bskcn_1), set(self.config.bskcn_2)]
        blend_at = [set(self.config.bskcn_3), set(self.config.bskcn_4)]
        for index, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            for slot in (0, 1):
                if index in keep_at[slot]:
                    kept[slot] = hidden_states
            for slot in (0, 1):
                if index in blend_at[slot]:
                    hidden_states = weight * kept[slot] + (1 - weight) * hidden_states
            hidden_states = decoder_layer(hidden_states, attention_mask=causal_mask, position_ids=position_ids,
                                          cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                          **kwargs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class SolarMistralForCausalLM(MistralForCausalLM):
    """MistralForCausalLM with SolarModel's skip-connection blends; Llama's weight names (the published ones)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = SolarModel(config)
        self.post_init()

"""DeepSeek-MoE (deepseek-moe-16b: `DeepseekForCausalLM`, model_type deepseek with `n_routed_experts`).

The Llama decoder (multi-head attention with rotary, RMSNorm) whose MLP, in layer i >= `first_k_dense_replace`
with i % `moe_layer_freq` == 0, is a mixture of experts: a softmax router over `n_routed_experts` picks the top
`num_experts_per_tok` experts per token (their probabilities as weights, renormalised when `norm_topk_prob`), and
`n_shared_experts` experts (one SwiGLU MLP of n_shared_experts x moe_intermediate_size) see every token
(DeepSeekMoE paper, Dai et al. 2024). The other layers keep Llama's dense MLP (`intermediate_size`).

transformers' DeepSeek-V2 MoE block is that computation (greedy top-k over softmax scores, routed_scaling_factor
1) under the same module names (mlp.gate, mlp.experts, mlp.shared_experts), so the MoE layers are that block; only
the renormalisation and the choice of layers are here. Published checkpoints store each expert as its own
gate/up/down_proj; transformers' MoE conversion (the one Qwen2-MoE and DeepSeek-V2 use) fuses them into the 3-D
expert parameters on load and splits them back on save.
"""

from __future__ import annotations

from transformers import LlamaForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe, DeepseekV2TopkRouter


def is_moe_layer(config, layer_idx: int) -> bool:
    return layer_idx >= config.first_k_dense_replace and layer_idx % config.moe_layer_freq == 0


class DeepseekMoeRouter(DeepseekV2TopkRouter):
    """DeepSeek-V2's greedy top-k softmax router, whose top-k weights sum to one when `norm_topk_prob`."""

    def __init__(self, config):
        super().__init__(config)
        self.norm_topk_prob = config.norm_topk_prob

    def forward(self, hidden_states):
        router_logits, topk_weights, topk_indices = super().forward(hidden_states)
        if self.norm_topk_prob and self.top_k > 1:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, topk_weights, topk_indices


class DeepseekMoeBlock(DeepseekV2Moe):
    def __init__(self, config):
        super().__init__(config)
        self.gate = DeepseekMoeRouter(config)


class DeepseekMoeLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose MoE layers (`is_moe_layer`) have DeepseekMoeBlock as their MLP."""

    def __init__(self, config):
        super().__init__(config)
        for layer_idx, layer in enumerate(self.model.layers):
            if is_moe_layer(config, layer_idx):
                layer.mlp = DeepseekMoeBlock(config)
        self.post_init()


def deepseek_moe_experts() -> list:
    """Published per-expert `mlp.experts.E.{gate,up,down}_proj.weight` <-> fused `mlp.experts.gate_up_proj` /
    `down_proj` (transformers' own conversion for this layout)."""
    return get_checkpoint_conversion_mapping("qwen2_moe")

"""Remote-code families read into native classes (automodel/models/families), checked against the families' math.

For each family row, a tiny checkpoint in the published layout (tests/models/published.py) is loaded through
`load_causal_lm` with trust_remote_code off (the folder holds no modeling code, so remote code could not run), and:
- our logits equal a reference forward written below from the family's published description (float64);
- `write_hf_model` writes every tensor back bit for bit under its published name, and config.json unchanged;
- a config field we do not translate stops the load with one line naming it (UserError: exit 2 in the CLI).

Where the reference's description comes from:
- Llama decoder (Aquila, DeepSeek LLM v1, InternLM, MiniCPM, Orion all derive from it): the LLaMA paper
  (Touvron et al. 2023): pre-norm RMSNorm, rotary embeddings on q and k (rotating the two halves of each head),
  SwiGLU MLP (down(silu(gate x) * up x)), causal softmax attention scaled by 1/sqrt(head_dim).
- InternLM: its model card / config: `bias: true` puts a bias on q, k, v and o.
- InternLM2: its model card / published weights: Llama under other names, q, k, v fused per key/value head.
- ChatGLM2/3: the ChatGLM2-6B model card and the GLM-4 technical report (GLM-4-9B keeps ChatGLM's decoder):
  RMSNorm, q/k/v bias only, multi-query groups, rotary on half of each head in interleaved pairs, SwiGLU.
- DeciLM / Nemotron-NAS: the Llama-3.3-Nemotron-Super-49B model card (neural architecture search: per-layer
  `block_configs`; a no_op attention or FFN is skipped with its norm; per-layer KV heads and FFN width).
- Baichuan-7B: its model card / published weights: Llama with q, k, v fused as `W_pack` (rows q, k, v).
- Baichuan2 (`BaichuanForCausalLM`, 7B): the Baichuan 2 technical report (Yang et al. 2023, "NormHead"): Baichuan-7B
  whose output head divides each vocabulary row by its L2 norm.
- DeepSeek-MoE: the DeepSeekMoE paper (Dai et al. 2024): the first layers dense, then a softmax router whose top-k
  experts' SwiGLU outputs are weighted by their probabilities (`norm_topk_prob`: divided by their sum), plus shared
  experts that see every token.
- Orion: the Orion-14B technical report: LayerNorm (with bias) in place of RMSNorm, eps from `rms_norm_eps`.
- MiniCPM: the MiniCPM paper (Hu et al. 2024, muP "model wind tunnel"): embeddings times `scale_emb`, each
  residual branch times `scale_depth / sqrt(num_layers)`, the last hidden state divided by
  `hidden_size / dim_model_base` before lm_head.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file

from automodel.checkpoint import write_hf_model
from automodel.errors import UserError
from automodel.models import load_causal_lm
from automodel.models.families import FAMILIES
from automodel.models.registry import family_rows
from tests.models.published import write_published_checkpoint
from tests.models.tiny import shared_tokenizer

# Families whose reference forward lives in a test file of their own (tests/models/test_family_<type>.py).
OWN_TEST_FILE = {"phi3small", "solar", "jais"}
ROWS = [row for row in family_rows() if row.published_type not in OWN_TEST_FILE]


def rms_norm(x, weights, prefix, config):
    if config["model_type"] == "orion":
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weights[f"{prefix}.weight"],
                                              weights[f"{prefix}.bias"], config["rms_norm_eps"])
    return weights[f"{prefix}.weight"] * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"])


def rotate(x, theta):
    """Rotary on (heads, tokens, head_dim): position t turns the pair (x[i], x[i + d/2]) by t / theta^(2i/d)."""
    dim = x.shape[-1]
    angles = torch.arange(x.shape[-2], dtype=x.dtype)[:, None] / theta ** (torch.arange(0, dim, 2, dtype=x.dtype) / dim)
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., : dim // 2], x[..., dim // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def linear(x, weights, name):
    out = x @ weights[f"{name}.weight"].T
    return out + weights[f"{name}.bias"] if f"{name}.bias" in weights else out


def internlm2_as_llama(config: dict, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """InternLM2's names read as the Llama ones; its `wqkv` is kv_heads groups of rows, each group holding that key
    head's query heads, then the key head, then the value head (InternLM2's model card / technical report)."""
    from tests.models.published import INTERNLM2_NAMES

    out = {}
    for name, tensor in weights.items():
        for llama, internlm2 in INTERNLM2_NAMES.items():
            name = name.replace(internlm2, llama)
        out[name] = tensor
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    for name in [n for n in out if n.endswith("attention.wqkv.weight")]:
        rows = out.pop(name).split(head_dim)  # one block of head_dim rows per head slot
        per_group = heads // kv_heads + 2
        q = [rows[g * per_group + j] for g in range(kv_heads) for j in range(per_group - 2)]
        k = [rows[g * per_group + per_group - 2] for g in range(kv_heads)]
        v = [rows[g * per_group + per_group - 1] for g in range(kv_heads)]
        prefix = name.removesuffix("attention.wqkv.weight") + "self_attn."
        out.update({f"{prefix}q_proj.weight": torch.cat(q), f"{prefix}k_proj.weight": torch.cat(k),
                    f"{prefix}v_proj.weight": torch.cat(v)})
    return out


def reference_logits(config: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """One sequence `ids` (tokens,) -> logits (tokens, vocab), float64, from the published names and fields."""
    weights = {name: tensor.double() for name, tensor in weights.items()}
    for name in [n for n in weights if n.endswith("W_pack.weight")]:  # Baichuan: q, k, v stacked by rows
        for part, tensor in zip("qkv", weights.pop(name).chunk(3)):
            weights[name.replace("W_pack", f"{part}_proj")] = tensor
    if config["model_type"] == "internlm2":
        weights = internlm2_as_llama(config, weights)
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config["hidden_size"] // heads
    theta = config.get("rotary", {}).get("base", config.get("rope_theta", 10000.0))
    minicpm = config["model_type"] == "minicpm"
    residual_scale = config["scale_depth"] / math.sqrt(layers) if minicpm else 1.0
    tokens = len(ids)
    causal = torch.full((tokens, tokens), float("-inf"), dtype=torch.float64).triu(1)

    h = weights["model.embed_tokens.weight"][ids] * (config["scale_emb"] if minicpm else 1.0)
    for i in range(layers):
        p = f"model.layers.{i}"
        if f"{p}.self_attn.q_proj.weight" in weights:  # DeciLM: a no_op attention layer has none
            x = rms_norm(h, weights, f"{p}.input_layernorm", config)
            q, k, v = (linear(x, weights, f"{p}.self_attn.{n}_proj").view(tokens, -1, head_dim).transpose(0, 1)
                       for n in "qkv")
            q, k = rotate(q, theta), rotate(k, theta)
            kv_heads = k.shape[0]  # DeciLM: per layer
            k, v = (t.repeat_interleave(heads // kv_heads, dim=0) for t in (k, v))
            attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + causal, dim=-1) @ v
            o = linear(attn.transpose(0, 1).reshape(tokens, -1), weights, f"{p}.self_attn.o_proj")
            h = h + residual_scale * o
        if f"{p}.mlp.gate_proj.weight" in weights:  # DeciLM: a no_op FFN layer has none
            x = rms_norm(h, weights, f"{p}.post_attention_layernorm", config)
            gate, up = linear(x, weights, f"{p}.mlp.gate_proj"), linear(x, weights, f"{p}.mlp.up_proj")
            mlp = torch.nn.functional.silu(gate) * up
            h = h + residual_scale * linear(mlp, weights, f"{p}.mlp.down_proj")
        elif f"{p}.mlp.gate.weight" in weights:  # DeepSeek-MoE: a mixture-of-experts layer
            h = h + deepseek_moe_mlp(rms_norm(h, weights, f"{p}.post_attention_layernorm", config), weights,
                                     f"{p}.mlp", config)
    h = rms_norm(h, weights, "model.norm", config)
    if minicpm:
        h = h / (config["hidden_size"] / config["dim_model_base"])
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    if config["architectures"] == ["BaichuanForCausalLM"]:  # Baichuan2's NormHead: unit-norm rows
        head = head / head.norm(dim=-1, keepdim=True)
    return h @ head.T


def swiglu(x, weights, prefix):
    gate, up = linear(x, weights, f"{prefix}.gate_proj"), linear(x, weights, f"{prefix}.up_proj")
    return linear(torch.nn.functional.silu(gate) * up, weights, f"{prefix}.down_proj")


def deepseek_moe_mlp(x, weights, prefix, config):
    """(tokens, hidden) -> the MoE layer's output, token by token: shared experts plus the top-k routed experts."""
    probs = torch.softmax(x @ weights[f"{prefix}.gate.weight"].T, dim=-1)
    top, chosen = probs.topk(config["num_experts_per_tok"], dim=-1)
    if config["norm_topk_prob"]:
        top = top / top.sum(dim=-1, keepdim=True)
    out = swiglu(x, weights, f"{prefix}.shared_experts")
    for t in range(len(x)):
        for weight, expert in zip(top[t], chosen[t].tolist()):
            out[t] = out[t] + weight * swiglu(x[t], weights, f"{prefix}.experts.{expert}")
    return out


def rotate_interleaved_half(x, theta):
    """ChatGLM's rotary on (heads, tokens, head_dim): only the first half of each head turns, in adjacent pairs
    (x[2i], x[2i + 1]) by t / theta^(2i / (head_dim / 2)); the second half passes through."""
    rotary = x.shape[-1] // 2
    angles = torch.arange(x.shape[-2], dtype=x.dtype)[:, None] / theta ** (
        torch.arange(0, rotary, 2, dtype=x.dtype) / rotary)
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0:rotary:2], x[..., 1:rotary:2]
    turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([turned, x[..., rotary:]], dim=-1)


def reference_chatglm_logits(config: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """ChatGLM2/3 from its published names and fields: RMSNorm; `query_key_value` rows [q heads | k groups |
    v groups] with bias; half-head interleaved rotary (base 10000 x rope_ratio); grouped-query attention;
    `dense_h_to_4h` rows [gate | up] with SwiGLU."""
    w = {name: tensor.double() for name, tensor in weights.items()}
    heads, groups, d = config["num_attention_heads"], config["multi_query_group_num"], config["kv_channels"]
    tokens, eps = len(ids), config["layernorm_epsilon"]
    causal = torch.full((tokens, tokens), float("-inf"), dtype=torch.float64).triu(1)

    def rms(x, name):
        return w[name] * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    h = w["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}"
        x = rms(h, f"{p}.input_layernorm.weight")
        qkv = x @ w[f"{p}.self_attention.query_key_value.weight"].T + w[f"{p}.self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=-1)
        q, k, v = (t.view(tokens, -1, d).transpose(0, 1) for t in (q, k, v))
        theta = 10000.0 * config["rope_ratio"]
        q, k = rotate_interleaved_half(q, theta), rotate_interleaved_half(k, theta)
        k, v = (t.repeat_interleave(heads // groups, dim=0) for t in (k, v))
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + causal, dim=-1) @ v
        h = h + attn.transpose(0, 1).reshape(tokens, -1) @ w[f"{p}.self_attention.dense.weight"].T
        x = rms(h, f"{p}.post_attention_layernorm.weight")
        gate, up = (x @ w[f"{p}.mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(gate) * up) @ w[f"{p}.mlp.dense_4h_to_h.weight"].T
    h = rms(h, "transformer.encoder.final_layernorm.weight")
    return h @ w["transformer.output_layer.weight"].T


@pytest.mark.parametrize("row", ROWS, ids=[r.test_id for r in ROWS])
def test_published_checkpoint_matches_reference_and_saves_back_bit_for_bit(row, tmp_path):
    source = write_published_checkpoint(row, tmp_path / "published")
    config = json.loads((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    model = load_causal_lm(str(source), dtype="float32").eval()
    assert isinstance(model, getattr(transformers, row.loads_into))

    chatglm = row.published_type == "chatglm"
    vocab = config["padded_vocab_size" if chatglm else "vocab_size"]
    ids = torch.randint(0, vocab, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids=ids[None]).logits[0].double()
    want = (reference_chatglm_logits if chatglm else reference_logits)(config, weights, ids)
    assert ours.std() > 0.1, "degenerate logits would compare equal for the wrong reason"
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)

    write_hf_model(model, shared_tokenizer(name=row.tokenizer), tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    for name in FAMILIES[row.published_type].derived_buffers:  # recomputed from the config, not written
        assert torch.equal(weights.pop(name), model.model.rotary_emb.inv_freq.float())
    assert saved.keys() == weights.keys()
    changed = [name for name in weights if not torch.equal(saved[name], weights[name])]
    assert not changed, f"not written back bit for bit: {changed}"
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config


def with_fields(row, tmp_path, **fields):
    folder = write_published_checkpoint(row, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BY_TYPE = {row.published_type: row for row in ROWS}
UNSUPPORTED = [
    ("deepseek", {"scoring_func": "sigmoid"}, "'scoring_func' = 'sigmoid' is not supported"),
    ("minicpm", {"num_experts": 8}, "'num_experts' = 8 is not supported"),
    ("aquila", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "'rope_scaling'"),
    ("internlm", {"rotary": {"base": 10000, "type": "xpos"}}, "'rotary'"),
    ("orion", {"use_alibi": True}, "'use_alibi' = True is not supported"),
    ("internlm2", {"bias": True}, "'bias' = True is not supported"),
    ("chatglm", {"pre_seq_len": 128}, "'pre_seq_len' = 128 is not supported"),
    ("nemotron-nas", {"block_configs": [{"attention": {"no_op": False, "n_heads_in_group": 2,
                                                      "replace_with_linear": True}, "ffn": {"no_op": True}}] * 3},
     "'block_configs[0].attention.replace_with_linear' = True is not supported"),
    ("chatglm", {"apply_residual_connection_post_layernorm": True}, "'apply_residual_connection_post_layernorm'"),
    ("baichuan", {"z_loss_weight": 0.1}, "'z_loss_weight' = 0.1 is not supported"),
    ("orion", {"hidden_act": "gelu"}, "'hidden_act' = 'gelu' is not supported"),
]


@pytest.mark.parametrize("family, fields, message", UNSUPPORTED,
                         ids=[f"{family}-{next(iter(fields))}" for family, fields, _ in UNSUPPORTED])
def test_unsupported_field_stops_with_one_line_naming_it(family, fields, message, tmp_path):
    folder = with_fields(BY_TYPE[family], tmp_path, **fields)
    with pytest.raises(UserError) as err:
        load_causal_lm(str(folder))
    text = str(err.value)
    assert message in text and str(folder) in text and "\n" not in text, text


def test_merge_lora_writes_the_published_layout(tmp_path):
    """`automodel merge-lora` on an adapter of a converted family (InternLM2: renamed blocks, grouped wqkv): the
    merged folder has the published weight names and config.json, and the logits of base + adapter."""
    from peft import LoraConfig, get_peft_model

    from automodel.inference.merge import merge_lora
    from automodel.inference.sources import ModelSource

    row = BY_TYPE["internlm2"]
    source = write_published_checkpoint(row, tmp_path / "published")
    tokenizer = shared_tokenizer(name=row.tokenizer)
    torch.manual_seed(0)
    adapted = get_peft_model(load_causal_lm(str(source)), LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False))
    write_hf_model(adapted, tokenizer, tmp_path / "adapter")

    merged = merge_lora(ModelSource(base=str(source), adapter=tmp_path / "adapter"), tmp_path / "merged")
    published = load_file(source / "model.safetensors")
    saved = load_file(merged / "model.safetensors")
    assert saved.keys() == published.keys()
    assert not torch.equal(saved["model.layers.0.attention.wqkv.weight"],
                           published["model.layers.0.attention.wqkv.weight"]), "the adapter was not merged"
    assert json.loads((merged / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(str(merged)).eval()(input_ids=ids).logits,
                                   adapted.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

"""Phi-3-Small (`Phi3SmallForCausalLM`, automodel/models/families/phi3small.py) read from its published layout.

The reference forward below is written from the published description, not from automodel's module:
- the Phi-3 technical report (arXiv 2404.14219, section 2: Phi-3-Small's GEGLU MLP, muP, grouped-query attention,
  block-sparse attention alternating with dense layers, each head attending to a different part of the KV
  cache through local blocks plus vertical strided blocks);
- the field descriptions of the published configuration_phi3_small.py (block size, number of local blocks,
  vertical stride, homogeneous vs per-head patterns, dense layer period, gegelu limit, muP multipliers, rope base)
  and the published weight names/shapes (head-major `query_key_value`: per key/value head its query heads, then
  its key head, then its value head; interleaved gate/linear columns of `up_proj`).
The block-sparse pattern is derived here token pair by token pair (`visible`), independently of the module's
vectorised mask; the 128k checkpoints' LongRoPE rotary (`rotate_published`, its sources there) serves
tests/models/test_family_phi3small_128k.py. LoRA and full SFT steps run for this row in tests/models/test_architectures.py, padding-free
batches in tests/models/test_padding_free.py and 2-process FSDP2 in tests/models/test_fsdp2_architectures.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from automodel.checkpoint import write_hf_model
from automodel.errors import UserError
from automodel.models import load_causal_lm
from automodel.models.registry import BY_NAME
from tests.models.published import write_published_checkpoint
from tests.models.test_families import rotate
from tests.models.tiny import shared_tokenizer

ROW = BY_NAME["Phi3SmallForCausalLM"]


def visible(config: dict, head: int, query: int, key: int) -> bool:
    """Whether query head `head` at position `query` sees the key at position `key` on a block-sparse layer: causal,
    and the key's block is one of the `blocksparse_num_local_blocks` latest blocks up to the query's, or a vertical
    stripe: every `blocksparse_vert_stride`-th block (the last of each stride), shifted per head by
    max(1, vert_stride // heads) blocks unless `blocksparse_homo_head_pattern`."""
    if key > query:
        return False
    size, stride = config["blocksparse_block_size"], config["blocksparse_vert_stride"]
    query_block, key_block = query // size, key // size
    if query_block - key_block < config["blocksparse_num_local_blocks"]:
        return True
    shift = 0 if config["blocksparse_homo_head_pattern"] else max(1, stride // config["num_attention_heads"])
    return (key_block + head * shift) % stride == stride - 1


def rotate_published(x: torch.Tensor, config: dict) -> torch.Tensor:
    """Phi-3-Small's rotary on (heads, tokens, head_dim), base `rope_embedding_base`. With `rope_scaling` (the 128k
    checkpoints' LongRoPE, type "su": LongRoPE paper, arXiv 2402.13753, section 3, and the field names of the
    published config.json), frequency i = base^(-2i/d) is divided by its own factor: `short_factor[i]` while the
    sequence (cache included) is at most `original_max_position_embeddings` tokens long, `long_factor[i]` beyond;
    cos and sin are multiplied by that regime's `short_mscale` / `long_mscale` where the config gives them, else
    by sqrt(1 + ln(s) / ln(original)), s = max_position_embeddings / original (LongRoPE's attention scaling)."""
    scaling = config.get("rope_scaling")
    if scaling is None:
        return rotate(x, config["rope_embedding_base"])
    tokens, dim = x.shape[-2], x.shape[-1]
    original = scaling.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    regime = "long" if tokens > original else "short"
    factors = torch.tensor(scaling[f"{regime}_factor"], dtype=torch.float64)
    ratio = config["max_position_embeddings"] / original
    mscale = scaling.get(f"{regime}_mscale", math.sqrt(1 + math.log(ratio) / math.log(original)))
    frequencies = 1 / (factors * config["rope_embedding_base"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.arange(tokens, dtype=torch.float64)[:, None] * frequencies
    cos, sin = angles.cos() * mscale, angles.sin() * mscale
    first, second = x[..., : dim // 2], x[..., dim // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def layer_norm(x, w, name, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)


def reference_logits(config: dict, weights: dict, ids: torch.Tensor, sparse: bool = True) -> torch.Tensor:
    """One sequence (tokens,) -> logits (tokens, vocab) in float64 from the published names and fields; `sparse`
    False treats every layer as dense (to show that the layout matters)."""
    w = {name: t.double() for name, t in weights.items()}
    heads, kv_heads, tokens = config["num_attention_heads"], config["num_key_value_heads"], len(ids)
    head_dim, eps = config["hidden_size"] // heads, config["layer_norm_epsilon"]
    causal = torch.tensor([[[visible({**config, "blocksparse_block_size": 10 ** 9}, 0, q, k) for k in range(tokens)]
                            for q in range(tokens)]])
    pattern = torch.tensor([[[visible(config, h, q, k) for k in range(tokens)] for q in range(tokens)]
                            for h in range(heads)])
    limit = config["gegelu_limit"]
    h = w["model.embed_tokens.weight"][ids] * config["mup_embedding_multiplier"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = layer_norm(h, w, f"{p}.input_layernorm", eps)
        qkv = x @ w[f"{p}.self_attn.query_key_value.weight"].T + w[f"{p}.self_attn.query_key_value.bias"]
        groups = qkv.view(tokens, kv_heads, heads // kv_heads + 2, head_dim)
        q = groups[:, :, :-2].reshape(tokens, heads, head_dim).transpose(0, 1)
        k, v = groups[:, :, -2].transpose(0, 1), groups[:, :, -1].transpose(0, 1)
        q, k = rotate_published(q, config), rotate_published(k, config)
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        dense_layer = (i + 1) % config["dense_attention_every_n_layers"] == 0
        allowed = causal if dense_layer or not sparse else pattern
        scores = q @ k.transpose(1, 2) * config["mup_attn_multiplier"] / head_dim  # muP: 1/d, not 1/sqrt(d)
        attn = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ v
        h = h + attn.transpose(0, 1).reshape(tokens, -1) @ w[f"{p}.self_attn.dense.weight"].T \
            + w[f"{p}.self_attn.dense.bias"]
        x = layer_norm(h, w, f"{p}.post_attention_layernorm", eps)
        up = x @ w[f"{p}.mlp.up_proj.weight"].T + w[f"{p}.mlp.up_proj.bias"]
        gate, linear = up[:, 0::2].clamp(max=limit), up[:, 1::2].clamp(-limit, limit)
        h = h + (gate * torch.sigmoid(1.702 * gate) * (linear + 1)) @ w[f"{p}.mlp.down_proj.weight"].T \
            + w[f"{p}.mlp.down_proj.bias"]
    h = layer_norm(h, w, "model.final_layernorm", eps)
    return h @ w["model.embed_tokens.weight"].T / config["mup_width_multiplier"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    source = write_published_checkpoint(ROW, tmp_path_factory.mktemp("phi3small"))
    return source, json.loads((source / "config.json").read_text()), load_file(source / "model.safetensors")


def test_layout_is_sparse_and_differs_per_head(published):
    _, config, _ = published
    tokens = 24
    pattern = torch.tensor([[[visible(config, h, q, k) for k in range(tokens)] for q in range(tokens)]
                            for h in range(config["num_attention_heads"])])
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    assert (pattern.sum((1, 2)) < causal.sum()).all(), "every head must drop some earlier keys at 24 tokens"
    assert not torch.equal(pattern[0], pattern[1]), "blocksparse_homo_head_pattern false: heads differ"


def test_float64_logits_match_the_reference_and_save_back_bit_for_bit(published, tmp_path):
    source, config, weights = published
    model = load_causal_lm(str(source), dtype="float32").eval()
    assert type(model).__name__ == "Phi3SmallLlamaForCausalLM"  # native modules, no remote code
    ids = torch.randint(0, config["vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.double()(input_ids=ids[None]).logits[0]
    want = reference_logits(config, weights, ids)
    assert ours.dtype == torch.float64 and ours.std() > 0.05, "degenerate logits would compare equal"
    # 1e-7, not 1e-12: transformers computes the rotary frequencies in float32 (fp32 math would miss by ~1e-4).
    torch.testing.assert_close(ours, want, rtol=1e-7, atol=1e-7)
    dense = reference_logits(config, weights, ids, sparse=False)
    assert (dense - want).abs().max() > 1e-3, "the block-sparse layout must change these logits"

    model.float()
    write_hf_model(model, shared_tokenizer(name=ROW.tokenizer), tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == weights.keys()
    changed = [name for name in weights if not torch.equal(saved[name], weights[name])]
    assert not changed, f"not written back bit for bit: {changed}"
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config


def test_padded_batch_gives_each_sequence_its_own_logits(published):
    """Right padding (the training collator's) and left padding with positions counted from the first real token
    (generation's): the real tokens get the logits of the sequence alone, sparse layers included."""
    source, config, _ = published
    model = load_causal_lm(str(source), dtype="float32").eval().double()
    generator = torch.Generator().manual_seed(2)
    long, short = torch.randint(0, 1000, (22,), generator=generator), torch.randint(0, 1000, (13,), generator=generator)
    with torch.no_grad():
        alone = [model(input_ids=s[None]).logits[0] for s in (long, short)]
        pad = torch.zeros(22 - 13, dtype=torch.long)
        for short_row, mask_row, real in ((torch.cat([short, pad]), torch.arange(22) < 13, slice(0, 13)),
                                          (torch.cat([pad, short]), torch.arange(22) >= 9, slice(9, 22))):
            mask = torch.stack([torch.ones(22, dtype=torch.bool), mask_row]).long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            batch = model(input_ids=torch.stack([long, short_row]), attention_mask=mask, position_ids=positions).logits
            torch.testing.assert_close(batch[0], alone[0], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(batch[1, real], alone[1], rtol=1e-9, atol=1e-9)


def test_eager_attention_gets_the_same_block_sparse_mask_and_flash_is_refused(published):
    """Eager attention takes the mask as additive floats (the sparse layers convert theirs); flash attention takes no
    score mask, so the class refuses it at load with one line."""
    source, _, _ = published
    ids = torch.randint(0, 1000, (2, 21), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0  # row 0 right-padded after 15 tokens
    with torch.no_grad():
        logits = [load_causal_lm(str(source), attn_implementation=impl).eval().double()(
            input_ids=ids, attention_mask=mask).logits for impl in ("eager", None)]
    # 1e-6: transformers' eager softmax runs in float32 even for float64 scores (the dense layout moves the
    # logits by more than 1e-3: see the parity test).
    torch.testing.assert_close(logits[0][mask.bool()], logits[1][mask.bool()], rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match="does not support Flash Attention"):
        load_causal_lm(str(source), attn_implementation="flash_attention_2")


def test_generation_with_a_cache_matches_the_full_forward(published):
    """Greedy decoding step by step (KV cache, sparse layers masking cached keys by their positions) predicts
    what one full forward over the same tokens predicts."""
    source, _, _ = published
    model = load_causal_lm(str(source), dtype="float32").eval().double()
    prompt = torch.arange(5, 15)[None]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        full = model(input_ids=out[:, :-1]).logits.argmax(-1)[0, prompt.shape[1] - 1:]
    assert out.shape[1] == 22 and torch.equal(full, out[0, prompt.shape[1]:])


def test_training_applies_the_published_dropouts_which_overrides_switch_off(published):
    """embedding_dropout_prob and ffn_dropout_prob act in training, as in the published code; the `model` section's
    overrides (native names) switch them off, which makes training and eval forwards equal."""
    source, config, _ = published
    assert config["embedding_dropout_prob"] and config["ffn_dropout_prob"]
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        model = load_causal_lm(str(source))
        assert not torch.equal(model.train()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
        model = load_causal_lm(str(source), embedding_dropout_prob=0.0, ffn_dropout_prob=0.0)
        torch.testing.assert_close(model.train()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def with_fields(tmp_path, **fields):
    folder = write_published_checkpoint(ROW, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


UNSUPPORTED = [  # rope_scaling (LongRoPE and others): tests/models/test_family_phi3small_128k.py
    ({"hidden_act": "gelu"}, "'hidden_act' = 'gelu' is not supported"),
    ({"ff_dim_multiplier": 2, "ff_intermediate_size": None}, "'ff_dim_multiplier' = 2 is not supported"),
    ({"rope_position_scale": 2.0}, "'rope_position_scale' = 2.0 is not supported"),
    ({"tie_word_embeddings": False}, "'tie_word_embeddings' = False is not supported"),
    ({"some_new_field": 3}, "'some_new_field' = 3 is not supported"),
]


@pytest.mark.parametrize("fields, message", UNSUPPORTED, ids=[next(iter(f)) for f, _ in UNSUPPORTED])
def test_unsupported_field_stops_with_one_line_naming_it(fields, message, tmp_path):
    folder = with_fields(tmp_path, **fields)
    with pytest.raises(UserError) as err:
        load_causal_lm(str(folder))
    text = str(err.value)
    assert message in text and str(folder) in text and "\n" not in text, text

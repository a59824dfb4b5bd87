"""Solar Pro (automodel/models/families/solar.py) read from its published layout, against its published math.

The reference forward below is written from Solar Pro's description: the model card of
upstage/solar-pro-preview-instruct (a depth-up-scaled Llama-style decoder) and its published config.json, whose
fields the published configuration class documents: Llama layers (pre-norm RMSNorm, rotary, grouped-query
attention, SwiGLU), `sliding_window` (a query sees the last `sliding_window` keys), and the block skip connections
`bskcn_1`..`bskcn_4` / `bskcn_tv`: the input of each `bskcn_1` (`bskcn_2`) layer is kept; the input of each
`bskcn_3` (`bskcn_4`) layer becomes `w * kept + (1 - w) * input`, with w = bskcn_tv[0] in training and
bskcn_tv[1] in inference (vLLM's Solar implementation reads the fields the same way).
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
from tests.models.test_families import linear, rms_norm, rotate, with_fields
from tests.models.tiny import shared_tokenizer

ROW = BY_NAME["SolarForCausalLM"]


def reference_logits(config: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor, training: bool):
    """One sequence (tokens,) -> logits (tokens, vocab) in float64 from the published names and fields."""
    w = {name: tensor.double() for name, tensor in weights.items()}
    heads, tokens = config["num_attention_heads"], len(ids)
    head_dim = config["hidden_size"] // heads
    query, key = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
    visible = (key <= query) & (query - key < config["sliding_window"])
    mask = torch.zeros(tokens, tokens, dtype=torch.float64).masked_fill(~visible, float("-inf"))
    blend = config["bskcn_tv"][0 if training else 1]

    h = w["model.embed_tokens.weight"][ids]
    kept = {}
    for i in range(config["num_hidden_layers"]):
        for slot, (keep, mix) in enumerate((("bskcn_1", "bskcn_3"), ("bskcn_2", "bskcn_4"))):
            if i in config[keep]:
                kept[slot] = h
        for slot, (keep, mix) in enumerate((("bskcn_1", "bskcn_3"), ("bskcn_2", "bskcn_4"))):
            if i in config[mix]:
                h = blend * kept[slot] + (1 - blend) * h
        p = f"model.layers.{i}"
        x = rms_norm(h, w, f"{p}.input_layernorm", config)
        q, k, v = (linear(x, w, f"{p}.self_attn.{n}_proj").view(tokens, -1, head_dim).transpose(0, 1) for n in "qkv")
        q, k = rotate(q, config["rope_theta"]), rotate(k, config["rope_theta"])
        k, v = (t.repeat_interleave(heads // k.shape[0], dim=0) for t in (k, v))
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + mask, dim=-1) @ v
        h = h + linear(attn.transpose(0, 1).reshape(tokens, -1), w, f"{p}.self_attn.o_proj")
        x = rms_norm(h, w, f"{p}.post_attention_layernorm", config)
        mlp = torch.nn.functional.silu(linear(x, w, f"{p}.mlp.gate_proj")) * linear(x, w, f"{p}.mlp.up_proj")
        h = h + linear(mlp, w, f"{p}.mlp.down_proj")
    return rms_norm(h, w, "model.norm", config) @ w["lm_head.weight"].T


def test_published_solar_matches_reference_in_training_and_inference_and_saves_back_bit_for_bit(tmp_path):
    source = write_published_checkpoint(ROW, tmp_path / "published")
    config = json.loads((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    model = load_causal_lm(str(source), dtype="float32")
    ids = torch.randint(0, config["vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
    assert len(ids) > config["sliding_window"], "the window must cut some keys off"

    got = {}
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            got[training] = model(input_ids=ids[None]).logits[0].double()
        want = reference_logits(config, weights, ids, training)
        assert got[training].std() > 0.1
        torch.testing.assert_close(got[training], want, rtol=1e-4, atol=1e-4)
    assert (got[True] - got[False]).abs().max() > 1e-2, "the training blend weight made no difference"

    write_hf_model(model, shared_tokenizer(name=ROW.tokenizer), tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == weights.keys()
    assert not [name for name in weights if not torch.equal(saved[name], weights[name])]
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config


@pytest.mark.parametrize("fields, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'rope_scaling'"),
    ({"attention_bias": True}, "'attention_bias' = True is not supported"),
    ({"bskcn_3": [0, 5]}, "'bskcn_3' = [0, 5] is not supported"),
    ({"bskcn_tv": [0.9]}, "'bskcn_tv' = [0.9] is not supported"),
    ({"bskcn_4": [9]}, "'bskcn_4' = [9] is not supported"),
], ids=["rope_scaling", "attention_bias", "blend-before-keep", "one-weight", "past-the-last-layer"])
def test_unsupported_solar_field_stops_with_one_line_naming_it(fields, message, tmp_path):
    folder = with_fields(ROW, tmp_path, **fields)
    with pytest.raises(UserError) as err:
        load_causal_lm(str(folder))
    assert message in str(err.value) and str(folder) in str(err.value) and "\n" not in str(err.value), err.value

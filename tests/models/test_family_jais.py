"""Jais (automodel/models/families/jais.py) read from its published layout, against its published math.

The reference forward below is written from the Jais technical report (Sengupta et al. 2023, "Jais and Jais-chat":
a GPT-3-style pre-norm decoder with SwiGLU, ALiBi and maximal-update parametrisation) and the fields of its
published config class (JAISConfig's documentation): embeddings times `embeddings_scale` (`mup_embeddings_scale`),
logits times `width_scale` (`mup_output_alpha * mup_width_scale`), attention scores divided by head_dim when
`scale_qk_dot_by_d` (else sqrt(head_dim)), SwiGLU `c_fc(x) * silu(c_fc2(x))`, ALiBi `-slope_h * (i - j)` with the
ALiBi paper's slopes (Press et al. 2022), GPT-2's Conv1D weights (input x output, c_attn = [q | k | v]), lm_head
tied to wte.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from automodel.checkpoint import write_hf_model
from automodel.batch import model_inputs
from automodel.batch import FlatCollator
from automodel.errors import UserError
from automodel.models import load_causal_lm
from automodel.models.families.jais import alibi_slopes
from automodel.models.registry import BY_NAME
from tests.models.published import write_published_checkpoint
from tests.models.test_families import with_fields
from tests.models.tiny import shared_tokenizer

ROW = BY_NAME["JAISLMHeadModel"]


def reference_logits(config: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """One sequence (tokens,) -> logits (tokens, vocab) in float64 from the published names and fields."""
    w = {name: tensor.double() for name, tensor in weights.items()}
    heads, tokens, eps = config["n_head"], len(ids), config["layer_norm_epsilon"]
    head_dim = config["n_embd"] // heads
    distance = (torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :]).double()
    alibi = -w["transformer.relative_pe.slopes"][:, :, None] * distance  # (heads, 1, 1) x (tokens, tokens)
    causal = torch.zeros(tokens, tokens, dtype=torch.float64).masked_fill(distance < 0, float("-inf"))
    score_scale = head_dim ** (-1.0 if config["scale_qk_dot_by_d"] else -0.5)

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def conv1d(x, name):
        return x @ w[f"{name}.weight"] + w[f"{name}.bias"]

    h = w["transformer.wte.weight"][ids] * config["embeddings_scale"]
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}"
        q, k, v = (t.view(tokens, heads, head_dim).transpose(0, 1)
                   for t in conv1d(norm(h, f"{p}.ln_1"), f"{p}.attn.c_attn").chunk(3, dim=-1))
        attn = torch.softmax(q @ k.transpose(1, 2) * score_scale + alibi + causal, dim=-1) @ v
        h = h + conv1d(attn.transpose(0, 1).reshape(tokens, -1), f"{p}.attn.c_proj")
        x = norm(h, f"{p}.ln_2")
        h = h + conv1d(conv1d(x, f"{p}.mlp.c_fc") * torch.nn.functional.silu(conv1d(x, f"{p}.mlp.c_fc2")),
                       f"{p}.mlp.c_proj")
    return norm(h, "transformer.ln_f") @ w["transformer.wte.weight"].T * config["width_scale"]


def test_published_jais_matches_reference_padded_and_padding_free_and_saves_back_bit_for_bit(tmp_path):
    source = write_published_checkpoint(ROW, tmp_path / "published")
    config = json.loads((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    model = load_causal_lm(str(source), dtype="float32").eval()
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randint(3, config["vocab_size"], (n,), generator=generator) for n in (20, 13))
    want = [reference_logits(config, weights, ids) for ids in (first, second)]
    assert want[0].std() > 0.1

    pad = config["pad_token_id"]
    left_padded = torch.stack([first, torch.cat([torch.full((7,), pad), second])])
    with torch.no_grad():
        padded = model(input_ids=left_padded, attention_mask=(torch.arange(20) >= torch.tensor([[0], [7]])).long())
        flat = model(**model_inputs(FlatCollator()([{"input_ids": t.tolist(), "labels": t.tolist()}
                                                    for t in (first, second)]))).logits[0]
    torch.testing.assert_close(padded.logits[0].double(), want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded.logits[1, 7:].double(), want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flat.double(), torch.cat(want), rtol=1e-4, atol=1e-4)

    write_hf_model(model, shared_tokenizer(name=ROW.tokenizer), tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == weights.keys()
    assert not [name for name in weights if not torch.equal(saved[name], weights[name])]
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config


def test_jais_30b_mup_field_names_give_the_same_model(tmp_path):
    """jais-30b's configs name the scalings mup_embeddings_scale, mup_output_alpha x mup_width_scale and
    mup_scale_qk_dot_by_d; they read as jais-13b's embeddings_scale, width_scale and scale_qk_dot_by_d."""
    ids = torch.arange(5, 25)[None]
    named_13b = load_causal_lm(str(write_published_checkpoint(ROW, tmp_path / "13b"))).eval()
    folder = write_published_checkpoint(ROW, tmp_path / "30b")
    config = json.loads((folder / "config.json").read_text())
    scales = {"mup_embeddings_scale": config.pop("embeddings_scale"), "mup_output_alpha": 2.0,
              "mup_width_scale": config.pop("width_scale") / 2.0,
              "mup_scale_qk_dot_by_d": config.pop("scale_qk_dot_by_d")}
    (folder / "config.json").write_text(json.dumps({**config, **scales}))
    named_30b = load_causal_lm(str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(named_30b(input_ids=ids).logits, named_13b(input_ids=ids).logits)


def test_a_checkpoint_without_the_alibi_slopes_gets_the_papers(tmp_path):
    folder = write_published_checkpoint(ROW, tmp_path / "published")
    weights = load_file(folder / "model.safetensors")
    stored = weights.pop("transformer.relative_pe.slopes")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(load_causal_lm(str(folder)).transformer.relative_pe.slopes, stored)


def test_alibi_slopes_for_heads_that_are_not_a_power_of_two():
    """The ALiBi paper's rule: the 4 slopes of 4 heads, then every other slope of 8 heads (2^-1, 2^-3)."""
    torch.testing.assert_close(alibi_slopes(6).flatten(),
                               torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))


@pytest.mark.parametrize("fields, message", [
    ({"position_embedding_type": "learned"}, "'position_embedding_type' = 'learned' is not supported"),
    ({"alibi_scaling": {"type": "linear", "factor": 2.0}}, "'alibi_scaling'"),
    ({"activation_function": "gelu_new"}, "'activation_function' = 'gelu_new' is not supported"),
    ({"mup_width_scale": 0.5}, "'mup_width_scale' = 0.5 is not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "'scale_attn_by_inverse_layer_idx' = True is not supported"),
], ids=["learned-positions", "alibi_scaling", "gelu", "both-width-scales", "inverse-layer-idx"])
def test_unsupported_jais_field_stops_with_one_line_naming_it(fields, message, tmp_path):
    folder = with_fields(ROW, tmp_path, **fields)
    with pytest.raises(UserError) as err:
        load_causal_lm(str(folder))
    assert message in str(err.value) and str(folder) in str(err.value) and "\n" not in str(err.value), err.value


def test_packed_rows_keep_examples_apart(tmp_path):
    """packed_sequence's rows carry a 4D block-diagonal mask (automodel/data/packing.py), which the shared ALiBi mask
    (automodel/models/families/alibi.py) combines with the bias: each example gets the logits it gets alone."""
    from automodel.data.packing import PackingCollator

    model = load_causal_lm(str(write_published_checkpoint(ROW, tmp_path / "published"))).eval()
    generator = torch.Generator().manual_seed(3)
    items = [{"input_ids": ids, "labels": ids} for ids in
             (torch.randint(3, 1000, (n,), generator=generator).tolist() for n in (9, 6))]
    with torch.no_grad():
        packed = model(**model_inputs(PackingCollator(0, 20)(items))).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([item["input_ids"]])).logits[0] for item in items])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)

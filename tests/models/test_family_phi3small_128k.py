"""Phi-3-small-128k: the Phi-3-Small row's checkpoints whose `rope_scaling` is LongRoPE (type "su": one short and
one long factor per rotary frequency, `original_max_position_embeddings`, each regime's cos/sin scale), read with
trust_remote_code off into transformers' "longrope" rotary (automodel/models/families/phi3small_config.py,
Phi3SmallRotaryEmbedding in phi3small.py).

The tiny checkpoint (tests/models/published.py VARIANTS["phi3small-128k"]) has an original length of 16 positions,
so 12 and 16 tokens run the short regime and 17 and 24 the long one. The reference forward is the 8k one of
tests/models/test_family_phi3small.py with its LongRoPE rotary (`rotate_published`: LongRoPE paper and the
published config fields). LoRA and full SFT run the checks of tests/models/test_architectures.py on it (their
64-token SQuAD rows train in the long regime).
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
from tests.models.published import variant_row, write_published_checkpoint
from tests.models.test_architectures import one_thread  # noqa: F401 (autouse fixture: one intra-op thread)
from tests.models.test_architectures import test_full_sft_changes_every_parameter_and_round_trips as sft_check
from tests.models.test_architectures import test_lora_all_linear_adapts_projections_and_round_trips as lora_check
from tests.models.test_family_phi3small import reference_logits
from tests.models.tiny import shared_tokenizer

ROW = variant_row("phi3small-128k")


def published_folder(folder, drop=(), **fields):
    """The tiny 128k checkpoint, its rope_scaling without the keys in `drop` and with `fields` over the top level."""
    write_published_checkpoint(ROW, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {k: v for k, v in config["rope_scaling"].items() if k not in drop}
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, config, load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return published_folder(tmp_path_factory.mktemp("phi3small128k"))


def float64_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


def ids_of(tokens: int, config: dict) -> torch.Tensor:
    return torch.randint(0, config["vocab_size"], (tokens,), generator=torch.Generator().manual_seed(tokens))


@pytest.mark.parametrize("tokens", [12, 16, 17, 24])
def test_float64_logits_match_the_reference_in_both_regimes(published, tokens):
    """Short regime up to original_max_position_embeddings tokens, long beyond: factors and scale both switch."""
    source, config, weights = published
    model = load_causal_lm(str(source), dtype="float32").eval().double()
    assert type(model.model.rotary_emb).__name__ == "Phi3SmallRotaryEmbedding"
    assert model.config.rope_parameters["rope_type"] == "longrope"  # transformers' LongRoPE computes the factors
    ids = ids_of(tokens, config)
    ours, want = float64_logits(model, ids), reference_logits(config, weights, ids)
    assert ours.std() > 0.05, "degenerate logits would compare equal"
    # 1e-7: transformers computes the rotary frequencies in float32.
    torch.testing.assert_close(ours, want, rtol=1e-7, atol=1e-7)
    regime = "long" if tokens > 16 else "short"
    other = {"short": "long", "long": "short"}[regime]
    swapped = {**config, "rope_scaling": {**config["rope_scaling"], f"{regime}_factor":
                                          config["rope_scaling"][f"{other}_factor"],
                                          f"{regime}_mscale": config["rope_scaling"][f"{other}_mscale"]}}
    assert (reference_logits(swapped, weights, ids) - want).abs().max() > 1e-3, "the other regime must differ"
    expected_scale = config["rope_scaling"][f"{regime}_mscale"]
    assert float(model.model.rotary_emb.attention_scaling) == pytest.approx(expected_scale)


def test_without_mscales_both_regimes_scale_by_the_longrope_formula(tmp_path):
    """A config without short_mscale/long_mscale: transformers' longrope as it is, whose attention factor
    sqrt(1 + ln(256 / 16) / ln(16)) scales both regimes, as the reference's formula does."""
    source, config, weights = published_folder(tmp_path / "plain", drop=("short_mscale", "long_mscale"))
    model = load_causal_lm(str(source), dtype="float32").eval().double()
    assert not hasattr(model.config, "longrope_mscales")
    for tokens in (12, 24):
        ids = ids_of(tokens, config)
        torch.testing.assert_close(float64_logits(model, ids), reference_logits(config, weights, ids),
                                   rtol=1e-7, atol=1e-7)
        assert model.model.rotary_emb.attention_scaling == pytest.approx(math.sqrt(2))


def test_saves_back_bit_for_bit_with_config_json_unchanged(published, tmp_path):
    source, config, weights = published
    model = load_causal_lm(str(source), dtype="float32")
    write_hf_model(model, shared_tokenizer(name=ROW.tokenizer), tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == weights.keys()
    assert not [name for name in weights if not torch.equal(saved[name], weights[name])]
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config


def test_lora_and_full_sft_train_and_round_trip(published, tmp_path):
    source, _, _ = published
    lora_check(ROW, lambda _: source, tmp_path / "lora")
    sft_check(ROW, lambda _: source, tmp_path / "sft")


UNSUPPORTED = [
    ({"rope_scaling": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16}},
     "field 'rope_scaling' of type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 8,
                       "original_max_position_embeddings": 16}},
     "field 'rope_scaling' short_factor must be a list of 8 positive numbers"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 4.0,
                       "original_max_position_embeddings": 16}},
     "field 'rope_scaling' key 'factor' is not supported"),
    ({"original_max_position_embeddings": 32}, "original_max_position_embeddings = 16 differs from the top-level"),
]


@pytest.mark.parametrize("fields, message", UNSUPPORTED, ids=["yarn", "factor-count", "unknown-key", "original"])
def test_unsupported_rope_scaling_stops_with_one_line_naming_it(fields, message, tmp_path):
    folder, _, _ = published_folder(tmp_path / "bad", **fields)
    with pytest.raises(UserError) as err:
        load_causal_lm(str(folder))
    text = str(err.value)
    assert message in text and "rope_scaling" in text and str(folder) in text and "\n" not in text, text

"""Baichuan2 (normalised lm_head) and DeepSeek-MoE (automodel/models/families/baichuan.py, deepseek_moe.py): what
the shared family tests (tests/models/test_families.py: reference logits, bit-for-bit round trip; tests/models/
test_architectures.py: LoRA and full SFT) do not cover.

References: the Baichuan 2 technical report (Yang et al. 2023) for NormHead (each vocabulary row divided by its L2
norm before the matmul, in training too) and ALiBi at 13B; the DeepSeekMoE paper (Dai et al. 2024) and the
deepseek-moe-16b config fields for the routing (softmax router, top-k, optional renormalisation, shared experts,
dense first layers). The reference forward itself is test_families.reference_logits.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from automodel.checkpoint import write_hf_model
from automodel.errors import UserError
from automodel.models import load_causal_lm
from automodel.models.families.baichuan import NormHead
from automodel.models.families.deepseek_moe import DeepseekMoeBlock
from automodel.models.registry import BY_NAME
from tests.models.published import write_published_checkpoint
from tests.models.test_families import reference_logits
from tests.models.tiny import shared_tokenizer

BAICHUAN2 = BY_NAME["BaichuanForCausalLM"]
DEEPSEEK_MOE = BY_NAME["DeepseekForCausalLM (MoE)"]


def edited(row, folder, drop=(), **fields):
    write_published_checkpoint(row, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    for name in drop:
        del config[name]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_baichuan2_head_normalises_rows_in_training_and_leaves_the_stored_weight_alone(tmp_path):
    source = write_published_checkpoint(BAICHUAN2, tmp_path / "published")
    model = load_causal_lm(str(source), dtype="float32")
    head = model.get_output_embeddings()
    assert isinstance(head, NormHead)
    stored = head.weight.detach().clone()
    assert not torch.allclose(stored.norm(dim=-1), torch.ones(len(stored)), atol=1e-3), "rows already unit-norm"

    ids = torch.arange(3, 19)[None]
    model.train()
    model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    # Through the normalisation, each row's gradient is orthogonal to the row (rescaling a row changes nothing).
    cosine = torch.nn.functional.cosine_similarity(head.weight.grad, head.weight.detach(), dim=-1)
    assert head.weight.grad.abs().sum() > 0 and cosine.abs().max() < 1e-4

    with torch.no_grad():
        model.eval()
        first = model(input_ids=ids).logits
        assert torch.equal(head.weight, stored), "an eval forward normalised the stored weight"
        head.weight.mul_(3.0)  # scaling rows does not change the logits of a normalised head
        torch.testing.assert_close(model(input_ids=ids).logits, first, rtol=1e-5, atol=1e-5)
        head.weight.copy_(stored)

    write_hf_model(model, shared_tokenizer(name=BAICHUAN2.tokenizer), tmp_path / "saved")
    assert torch.equal(load_file(tmp_path / "saved" / "model.safetensors")["lm_head.weight"],
                       load_file(source / "model.safetensors")["lm_head.weight"])


def test_baichuan_13b_alibi_config_stops_with_one_line(tmp_path):
    folder = edited(BAICHUAN2, tmp_path / "b13", drop=("max_position_embeddings",), model_max_length=4096)
    with pytest.raises(UserError) as err:
        load_causal_lm(str(folder))
    text = str(err.value)
    assert "'max_position_embeddings' is missing" in text and "ALiBi" in text and "\n" not in text, text


@pytest.mark.parametrize("fields, message", [
    ({"n_shared_experts": None}, "'n_shared_experts' = None is not supported"),
    ({"scoring_func": "sigmoid"}, "'scoring_func' = 'sigmoid' is not supported"),
    ({"ep_size": 2}, "'ep_size' = 2 is not supported"),
], ids=["no-shared-experts", "sigmoid", "unknown-field"])
def test_deepseek_moe_unsupported_fields_stop_with_one_line(fields, message, tmp_path):
    folder = edited(DEEPSEEK_MOE, tmp_path / "bad", **fields)
    with pytest.raises(UserError) as err:
        load_causal_lm(str(folder))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_deepseek_moe_layer_choice_and_plain_topk_match_the_reference(tmp_path):
    """The published deepseek-moe-16b settings (norm_topk_prob false) with every other layer MoE from layer 0:
    layers 0 and 2 route, 1 and 3 stay dense; two shared experts."""
    row = dataclasses.replace(DEEPSEEK_MOE, tiny={**DEEPSEEK_MOE.tiny, "num_hidden_layers": 4, "norm_topk_prob": False,
                                                  "first_k_dense_replace": 0, "moe_layer_freq": 2,
                                                  "n_shared_experts": 2})
    source = write_published_checkpoint(row, tmp_path / "published")
    model = load_causal_lm(str(source), dtype="float32").eval()
    assert [isinstance(layer.mlp, DeepseekMoeBlock) for layer in model.model.layers] == [True, False, True, False]
    config = json.loads((source / "config.json").read_text())
    ids = torch.randint(0, config["vocab_size"], (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(input_ids=ids[None]).logits[0].double()
    want = reference_logits(config, load_file(source / "model.safetensors"), ids)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_deepseek_moe_router_aux_loss_is_refused(tmp_path):
    """The published code adds aux_loss_alpha x its balance loss while training; automodel computes none for this
    row (as for DeepSeek-V2/V3), so asking for it is an error rather than a silent no-op."""
    from automodel.models.quirks import RouterAuxLoss

    source = write_published_checkpoint(DEEPSEEK_MOE, tmp_path / "published")
    with pytest.raises((UserError, ValueError)) as err:
        RouterAuxLoss(load_causal_lm(str(source), output_router_logits=True))
    assert "output_router_logits" in str(err.value) and "\n" not in str(err.value), str(err.value)

"""Baichuan2-7B (normalised lm_head) and DeepSeek-MoE (automodel/models/families/baichuan.py, deepseek_moe.py):
variants of the Baichuan and DeepSeek rows whose tiny checkpoints (the rows' own, tests/models/published.py) are
Baichuan-7B and dense DeepSeek. Here each variant gets what its row gets in the shared tests: the reference forward
and bit-for-bit round trip of tests/models/test_families.py, the LoRA and full-SFT checks of tests/models/
test_architectures.py, and (DeepSeek-MoE) a 2-process FSDP2 run matching one process, plus its own checks.

References: the Baichuan 2 technical report (Yang et al. 2023) for NormHead (each vocabulary row divided by its L2
norm before the matmul, in training too; Baichuan-13B and Baichuan2-13B, with ALiBi: tests/models/
test_family_baichuan13b.py); the DeepSeekMoE paper (Dai et al. 2024) and the
deepseek-moe-16b config fields for the routing (softmax router, top-k, optional renormalisation, shared experts,
dense first layers). The reference forward itself is test_families.reference_logits.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from automodel.checkpoint import write_hf_model
from automodel.errors import UserError
from automodel.models import load_causal_lm
from automodel.models.families.baichuan import NormHead
from automodel.models.families.deepseek_moe import DeepseekMoeBlock
from automodel.training.recipe import FinetuneRecipe
from tests.distributed_helpers import free_port, losses, start_job
from tests.models.fsdp2_worker import STEPS, fsdp2_config
from tests.models.published import variant_row, write_published_checkpoint
from tests.models.test_architectures import one_thread  # noqa: F401 (autouse fixture: one intra-op thread)
from tests.models.test_architectures import test_full_sft_changes_every_parameter_and_round_trips as sft_check
from tests.models.test_architectures import test_lora_all_linear_adapts_projections_and_round_trips as lora_check
from tests.models.test_families import reference_logits
from tests.models.test_families import test_published_checkpoint_matches_reference_and_saves_back_bit_for_bit as \
    reference_check
from tests.models.tiny import shared_tokenizer
from tests.models.tiny_configs import variant


BAICHUAN2, DEEPSEEK_MOE = variant_row("baichuan2"), variant_row("deepseek-moe")
VARIANTS = {"baichuan2": BAICHUAN2, "deepseek-moe": DEEPSEEK_MOE}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_reference_and_saves_back_bit_for_bit(name, tmp_path):
    reference_check(VARIANTS[name], tmp_path)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_lora_and_full_sft_train_and_round_trip(name, tmp_path):
    row = VARIANTS[name]
    folder = write_published_checkpoint(row, tmp_path / "published")
    lora_check(row, lambda _: folder, tmp_path / "lora")
    sft_check(row, lambda _: folder, tmp_path / "sft")


def edited(row, folder, **fields):
    write_published_checkpoint(row, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
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
    row = variant(DEEPSEEK_MOE, num_hidden_layers=4, norm_topk_prob=False, first_k_dense_replace=0, moe_layer_freq=2,
                  n_shared_experts=2)
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
    from automodel.models.router_aux_loss import RouterAuxLoss

    source = write_published_checkpoint(DEEPSEEK_MOE, tmp_path / "published")
    with pytest.raises((UserError, ValueError)) as err:
        RouterAuxLoss(load_causal_lm(str(source), output_router_logits=True))
    assert "output_router_logits" in str(err.value) and "\n" not in str(err.value), str(err.value)


def assert_fsdp2_sft_matches_one_process(checkpoints: dict[str, object], tmp_path) -> None:
    """Full SFT of each checkpoint ({architecture of its row: folder}) in one 2-process FSDP2 group (the runs in
    turn, so the processes start once) and in this process: equal per-step losses, the same consolidated tensors
    under the published names, the published config.json in both outputs."""
    runs = [{"architecture": architecture, "model_dir": str(folder), "out_dir": str(tmp_path / f"fsdp2-{i}"),
             "lora": False} for i, (architecture, folder) in enumerate(checkpoints.items())]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    port, logs = free_port(), [tmp_path / f"rank{rank}.log" for rank in range(2)]
    command = [sys.executable, "-m", "tests.models.fsdp2_worker", str(tmp_path / "runs.json")]
    procs = start_job([(command, dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port))) for rank in range(2)], port, 600,
                      stdouts=[log.open("w") for log in logs])
    try:
        for i, (architecture, folder) in enumerate(checkpoints.items()):
            recipe = FinetuneRecipe(fsdp2_config(architecture, folder, tmp_path / f"single-{i}", lora=False))
            recipe.setup()
            assert recipe.parts.parallel.strategy == "none"
            recipe.train()
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for proc in procs:
            proc.kill()
    tails = "".join(log.read_text()[-3000:] for log in logs)
    assert [p.returncode for p in procs] == [0, 0], tails
    for i, folder in enumerate(checkpoints.values()):
        sharded, single = tmp_path / f"fsdp2-{i}", tmp_path / f"single-{i}"
        assert (sharded / "DONE").is_file(), tails
        assert losses(sharded) == pytest.approx(losses(single), rel=1e-5) and len(losses(single)) == STEPS
        saved = [load_file(out / f"step_{STEPS}" / "model" / "model.safetensors") for out in (sharded, single)]
        published = load_file(folder / "model.safetensors")
        assert saved[0].keys() == saved[1].keys() == published.keys()  # the published names (experts, W_pack)
        for name, want in saved[1].items():
            torch.testing.assert_close(saved[0][name], want, rtol=1e-5, atol=1e-5, msg=name)
        configs = [json.loads((out / f"step_{STEPS}" / "model" / "config.json").read_text())
                   for out in (sharded, single)]
        assert configs[0] == configs[1] == json.loads((folder / "config.json").read_text())

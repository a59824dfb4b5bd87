"""The recipe's default loss path is the chunked output head, and it trains exactly like the unchunked one.

stories260K on real SQuAD, 4 steps: per-step training and validation losses of `loss_fn.chunk_size: 3` (many
chunks per micro-batch, a partial last one) equal those of `chunk_size: null` (logits at the label positions in one
piece), fp32, rtol 1e-5 (only the rounding of the chunked matmuls differs).
"""

from __future__ import annotations

import logging

import pytest

from automodel.errors import UserError
from automodel.training.loss import DEFAULT_CHUNK_SIZE, MaskedCrossEntropy
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import STORIES
from tests.helpers import tiny_squad_config


def _run(tmp_path, peft: bool, chunk_size):
    cfg = tiny_squad_config(tmp_path, peft=peft, max_steps=4, train_samples=32)
    cfg["validation_dataset"]["limit_dataset_samples"] = 8
    cfg["loss_fn"] = {"chunk_size": chunk_size}
    cfg["checkpoint"]["enabled"] = False
    recipe = FinetuneRecipe(cfg)
    return recipe, recipe.run()


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "sft"])
def test_chunked_loss_trains_like_the_unchunked_loss(tmp_path, peft):
    chunked_recipe, chunked = _run(tmp_path / "chunked", peft, 3)
    plain_recipe, plain = _run(tmp_path / "plain", peft, None)
    assert chunked_recipe.parts.forward_loss.output_head is not None and plain_recipe.parts.forward_loss.output_head is None
    assert len(chunked.train_losses) == 4
    assert chunked.train_losses == pytest.approx(plain.train_losses, rel=1e-5)
    assert chunked.val_losses == pytest.approx(plain.val_losses, rel=1e-5)


def test_chunked_head_is_the_default():
    assert MaskedCrossEntropy().chunk_size == DEFAULT_CHUNK_SIZE


def test_unknown_architecture_falls_back_with_one_log_line(caplog):
    import torch

    from automodel.models.forward_plan import chunked_head_for

    with caplog.at_level(logging.INFO, logger="automodel"):
        assert chunked_head_for(torch.nn.Linear(2, 2), MaskedCrossEntropy()) is None
    assert [r.getMessage() for r in caplog.records] == [
        "chunked output head off: Linear is not in automodel's output-head table (automodel/models/label_rows.py); "
        "computing logits at the label positions with logits_to_keep"]


def test_a_loss_that_overrides_only_call_is_not_bypassed(caplog):
    """A user's MaskedCrossEntropy subclass that changes `__call__` keeps its meaning: the recipe computes logits and
    calls it, and says why the chunked head is off."""
    from transformers import AutoModelForCausalLM

    from automodel.models.forward_plan import chunked_head_for

    class Smoothed(MaskedCrossEntropy):
        def __call__(self, logits, targets):
            return super().__call__(logits, targets) * 0.9

    model = AutoModelForCausalLM.from_pretrained(str(STORIES))
    assert chunked_head_for(model, MaskedCrossEntropy()) is not None
    with caplog.at_level(logging.INFO, logger="automodel"):
        assert chunked_head_for(model, Smoothed()) is None
    assert [r.getMessage() for r in caplog.records] == [
        "chunked output head off: Smoothed overrides __call__ but not head_loss; computing logits at the label "
        "positions with logits_to_keep"]


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "1024"])
def test_bad_chunk_size_is_a_user_error(value):
    with pytest.raises(UserError, match="loss_fn.chunk_size: expected a positive number of label tokens or null"):
        MaskedCrossEntropy(chunk_size=value)


def test_the_forward_plan_installs_its_hooks_and_the_loss_only_runs_it():
    """`plan_forward` (called by the recipe right after the model is built) decides the optimisations and installs
    the last layer's row hooks; `ForwardLoss` installs nothing and runs what the plan says: the last layer's MLP sees
    only the label rows, and the loss is the plain forward's."""
    import torch

    from automodel.batch import shift_labels
    from automodel.batch import pad_collate
    from automodel.models import load_causal_lm
    from automodel.models.decoder_layers import decoder_layers
    from automodel.models.forward_plan import plan_forward
    from automodel.training.loss import ForwardLoss

    model = load_causal_lm(str(STORIES)).eval()
    last = decoder_layers(model)[-1]

    def hooks() -> int:
        return len(last._forward_pre_hooks) + len(last.mlp._forward_pre_hooks) + len(last.mlp._forward_hooks)

    before = hooks()
    batch = pad_collate([{"input_ids": list(range(5, 25)), "labels": [-100] * 15 + list(range(20, 25))}], 0)
    with torch.no_grad():
        expected = model(**batch).logits
    loss_fn = MaskedCrossEntropy(chunk_size=4)
    plan = plan_forward(model, loss_fn)
    assert plan.describe() == ("logits at label positions only, chunked output head (4 label tokens a chunk), "
                               "last layer on label rows")
    assert hooks() == before + 3
    forward_loss = ForwardLoss(model, loss_fn, plan)
    assert hooks() == before + 3
    mlp_rows = []
    last.mlp.register_forward_pre_hook(lambda module, args: mlp_rows.append(args[0].shape[1]))
    with torch.no_grad():
        summed, label_tokens = forward_loss(batch)
    assert mlp_rows == [5] and label_tokens == 5  # the 5 rows predicting a label, not all 20
    targets = shift_labels(batch["labels"])
    reference = torch.nn.functional.cross_entropy(expected[0], targets[0], ignore_index=-100, reduction="sum")
    assert float(summed) == pytest.approx(float(reference), rel=1e-5)

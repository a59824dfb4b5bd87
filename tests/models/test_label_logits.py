"""Computing logits only at label positions (`logits_to_keep` mask) gives the full-logits loss and gradients.

For every native architecture (tied and untied heads, Gemma 2's final soft-capping, Cohere's logit scale, Granite's
logits scaling, MoE...): same summed loss and same gradients, fp32, rtol 1e-5 / atol 1e-5 x the largest gradient."""

from __future__ import annotations

import pytest
import torch

from automodel.batch import pad_collate
from automodel.data.squad import make_squad_dataset
from automodel.models.registry import native_rows
from automodel.batch import IGNORE_INDEX, shift_labels
from automodel.models.forward_plan import supports_label_logits
from automodel.training.loss import MaskedCrossEntropy
from tests.conftest import SQUAD_DEV
from tests.models.test_architectures import one_thread  # noqa: F401 (fixture)
from tests.models.tiny import shared_tokenizer, tiny_config

ROWS = native_rows()


def _loss_and_grads(model, batch, keep_labels_only: bool):
    model.zero_grad(set_to_none=True)
    targets = shift_labels(batch["labels"])
    keep = targets != IGNORE_INDEX
    kwargs = {"logits_to_keep": keep} if keep_labels_only else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    loss = MaskedCrossEntropy()(logits, targets[keep] if keep_labels_only else targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("row", ROWS, ids=[r.test_id for r in ROWS])
def test_label_position_logits_match_full_logits(row, one_thread):  # noqa: F811
    from transformers import AutoModelForCausalLM

    tokenizer = shared_tokenizer(name=row.tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(row, tokenizer)).eval()  # no dropout (GPTBigCode has some)
    assert supports_label_logits(model), f"{row.native_class}.forward takes no logits_to_keep"
    data = make_squad_dataset(tokenizer, str(SQUAD_DEV), split="validation", seq_length=48, limit_dataset_samples=2)
    batch = pad_collate([data[0], data[1]], tokenizer.pad_token_id)

    full_loss, full_grads = _loss_and_grads(model, batch, keep_labels_only=False)
    kept_loss, kept_grads = _loss_and_grads(model, batch, keep_labels_only=True)
    torch.testing.assert_close(kept_loss, full_loss, rtol=1e-5, atol=1e-5)
    assert kept_grads.keys() == full_grads.keys() and kept_grads
    for name, grad in full_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-5 * max(scale, 1e-12), msg=name)

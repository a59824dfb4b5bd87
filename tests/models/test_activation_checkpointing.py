"""`distributed.activation_checkpointing: true` works for every tested row of the supported-models table.

For each architecture the tiny checkpoint of test_architectures.py is built through `FinetuneRecipe` twice, with
activation checkpointing off and on, for full SFT and for LoRA (there the only trainable weights are the adapters
inside the checkpointed layers, behind a frozen embedding). One backward on the same real SQuAD batch (two rows,
padded to one length) in `.train()` mode, as the recipe trains, must:
- really recompute: forward hooks on the modules inside each decoder layer (the model's `_no_split_modules`, the
  layers FSDP2 shards) show each layer running once without checkpointing, and with it once more in backward
  (the replay starts at the layer's first module);
- give the same loss and the same gradients (fp32; rtol 1e-5, atol 1e-6: only the recompute's op order may differ).
Both runs start the backward from the same RNG state. GPTBigCode's default config trains with dropout 0.1: its
equalities hold only because torch's checkpoint restores the RNG state before recomputing, so the replay draws the
forward's masks (with `preserve_rng_state=False` its two tests fail). MoE routing is a deterministic function of the
replayed inputs.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from automodel.batch import pad_collate
from automodel.data.squad import make_squad_dataset
from automodel.models.decoder_layers import decoder_layers
from automodel.models.registry import tested_rows
from automodel.models.unwrap import transformers_model
from automodel.training.recipe import FinetuneRecipe
from tests.models.test_architectures import checkpoint, one_thread, run_config  # noqa: F401 (fixtures)
from tests.models.tiny_configs import tiny_overrides

ROWS = tested_rows()
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6


@lru_cache(maxsize=None)
def squad_rows(tokenizer, **settings):
    """`make_squad_dataset`, tokenized once per tokenizer for the module: the off and on recipes of a row (and its
    SFT and LoRA tests) read the same rows, and fingerprinting a 150k-token tokenizer for the data cache costs more
    than the backward being tested."""
    return make_squad_dataset(tokenizer, **settings)


def build_recipe(row, model_dir, out_dir, lora: bool, checkpointing: bool) -> FinetuneRecipe:
    cfg = run_config(row, model_dir, out_dir, lora=lora)
    cfg["dataset"]["_target_"] = f"{__name__}.squad_rows"
    cfg["allow_targets"] = [*cfg["allow_targets"], __name__]  # a target in the tests package: allowed on purpose
    cfg["distributed"] = {"activation_checkpointing": checkpointing}
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    return recipe


def one_backward(recipe: FinetuneRecipe) -> tuple[float, dict[str, torch.Tensor | None], list[list[str]]]:
    """Loss, gradients and, per decoder layer, the names of the modules inside it in the order they ran, for one
    backward on the first two training rows. transformers checkpoints a layer's `forward`, not its `__call__` (so
    FSDP2's hooks on the layer stay outside the checkpoint): the recompute shows in the modules inside the layer."""
    layers = decoder_layers(recipe.parts.model)
    calls: list[list[str]] = [[] for _ in layers]

    def recorder(index, name):
        def hook(module, args, output):
            calls[index].append(name)
        return hook

    handles = [inner.register_forward_hook(recorder(i, name))
               for i, layer in enumerate(layers) for name, inner in layer.named_modules() if inner is not layer]
    try:
        recipe.parts.model.train()
        torch.manual_seed(0)  # the same dropout masks in both runs; the checkpoint must replay them in backward
        train_set = recipe.parts.data.train_set
        batch = pad_collate([train_set[0], train_set[1]], recipe.parts.tokenizer.pad_token_id)
        loss, _ = recipe.backward([batch])
    finally:
        for handle in handles:
            handle.remove()
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in recipe.parts.model.named_parameters() if p.requires_grad}
    return loss, grads, calls


@pytest.mark.parametrize("lora", [False, True], ids=["sft", "lora"])
@pytest.mark.parametrize("row", ROWS, ids=[r.test_id for r in ROWS])
def test_activation_checkpointing_recomputes_layers_and_keeps_gradients(row, lora, checkpoint, tmp_path):
    model_dir = checkpoint(row)
    plain = build_recipe(row, model_dir, tmp_path / "plain", lora, checkpointing=False)
    ckpt = build_recipe(row, model_dir, tmp_path / "ckpt", lora, checkpointing=True)
    assert not transformers_model(plain.parts.model).is_activation_checkpointing
    assert transformers_model(ckpt.parts.model).is_activation_checkpointing

    loss_plain, grads_plain, calls_plain = one_backward(plain)
    loss_ckpt, grads_ckpt, calls_ckpt = one_backward(ckpt)
    assert len(calls_plain) == tiny_overrides(row)["num_hidden_layers"]
    for plain_calls, ckpt_calls in zip(calls_plain, calls_ckpt):
        # The forward, then the recompute in backward from the layer's start; torch's non-reentrant checkpoint
        # stops recomputing once every tensor the backward needs is back, so the replay may skip a tail.
        assert plain_calls and ckpt_calls[:len(plain_calls)] == plain_calls
        replay = ckpt_calls[len(plain_calls):]
        assert replay and replay == plain_calls[:len(replay)], "with checkpointing each layer runs again in backward"

    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    missing = [n for n, g in grads_plain.items() if g is None]
    assert not missing, f"parameters without a gradient: {missing}"
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)

"""The chunked output head (automodel/training/loss.py `head_loss`, `ForwardLoss` there) gives the full-logits loss
and gradients.

For every native architecture (tied heads; untied for Llama and the architectures with a final transform: Gemma 2/3
soft-capping, Cohere logit scale, Granite logits scaling, MiniCPM3 hidden scaling) and for a LoRA-adapted lm_head:
same summed loss and same gradients as MaskedCrossEntropy on full logits, fp32, rtol 1e-5 / atol 1e-5 x the
largest gradient, with a chunk size that makes several chunks and a last partial one. Plus a measurement that the
chunked path never materialises a [label_tokens x vocab] tensor while the unchunked one does.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from automodel.batch import pad_collate
from automodel.data.squad import make_squad_dataset
from automodel.models.label_rows import LOGIT_TRANSFORMS, find_output_head
from automodel.models.loader import load_causal_lm
from automodel.models.registry import family_rows, native_rows
from automodel.batch import IGNORE_INDEX, shift_labels
from automodel.training.loss import MaskedCrossEntropy, forward_chunked_loss
from tests.conftest import SQUAD_DEV
from tests.models.test_architectures import one_thread  # noqa: F401 (fixture)
from tests.models.published import write_published_checkpoint
from tests.models.test_label_logits import _loss_and_grads
from tests.models.tiny import shared_tokenizer, tiny_config

ROWS = native_rows()
# Chunk boundaries change the matmuls' row counts, hence their fp32 blocking and rounding: measured worst case over
# all rows 2.3e-5 x the largest gradient (in float64 the difference is ~1e-15, test below).
GRAD_ATOL = 5e-5
UNTIED = [r for r in ROWS if LOGIT_TRANSFORMS.get(r.native_class) or r.native_class == "LlamaForCausalLM"]


def _batch(tokenizer, rows: int = 2, seq_length: int = 48):
    data = make_squad_dataset(tokenizer, str(SQUAD_DEV), split="validation", seq_length=seq_length,
                              limit_dataset_samples=rows)
    return pad_collate([data[i] for i in range(rows)], tokenizer.pad_token_id)


def _chunk_size_with_partial_last(label_tokens: int) -> int:
    size = next((c for c in (2, 3, 4, 5) if label_tokens % c and label_tokens > c), None)
    assert size is not None, f"{label_tokens} label tokens: no chunk size gives several chunks and a partial one"
    return size


def _chunked_loss_and_grads(model, batch, chunk_size: int):
    model.zero_grad(set_to_none=True)
    head, why = find_output_head(model)
    assert head is not None, why
    targets = shift_labels(batch["labels"])
    loss, _ = forward_chunked_loss(model, head, MaskedCrossEntropy(chunk_size), batch, targets,
                                   targets != IGNORE_INDEX)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, batch, grad_atol: float = GRAD_ATOL, loss_rtol: float = 1e-5):
    full_loss, full_grads = _loss_and_grads(model, batch, keep_labels_only=False)
    chunk_size = _chunk_size_with_partial_last(int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum()))
    loss, grads = _chunked_loss_and_grads(model, batch, chunk_size)
    torch.testing.assert_close(loss, full_loss, rtol=loss_rtol, atol=loss_rtol)
    assert grads.keys() == full_grads.keys() and grads
    for name, grad in full_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=grad_atol * max(scale, 1e-12), msg=name)


def _tiny_model(row, tokenizer, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(row, tokenizer)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).eval()  # no dropout (GPTBigCode has some)


@pytest.mark.parametrize("row", ROWS, ids=[r.test_id for r in ROWS])
def test_chunked_head_matches_full_logits(row, one_thread):  # noqa: F811
    tokenizer = shared_tokenizer(name=row.tokenizer)
    model = _tiny_model(row, tokenizer)
    _assert_same(model, _batch(tokenizer))


FAMILIES = family_rows()


@pytest.mark.parametrize("row", FAMILIES, ids=[r.test_id for r in FAMILIES])
def test_remote_code_family_gets_the_chunked_head(row, tmp_path, one_thread):  # noqa: F811
    """The families' classes (automodel/models/families) inherit their native parent's forward, so they share its
    head: the chunked path is on for them and matches the full logits."""
    tokenizer = shared_tokenizer(name=row.tokenizer)
    model = load_causal_lm(str(write_published_checkpoint(row, tmp_path / "published"))).eval()
    _assert_same(model, _batch(tokenizer))


@pytest.mark.parametrize("row", UNTIED, ids=[r.test_id for r in UNTIED])
def test_chunked_untied_head_matches_full_logits(row, one_thread):  # noqa: F811
    tokenizer = shared_tokenizer(name=row.tokenizer)
    model = _tiny_model(row, tokenizer, tie_word_embeddings=False)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    _assert_same(model, _batch(tokenizer))


@pytest.mark.parametrize("architecture", ["Qwen2ForCausalLM", "Gemma2ForCausalLM", "CohereForCausalLM"])
def test_chunked_head_is_exact_in_float64(architecture, one_thread):  # noqa: F811
    """The fp32 differences above are rounding: in float64 the chunked path matches to ~1e-12."""
    row = next(r for r in ROWS if r.native_class == architecture)
    tokenizer = shared_tokenizer(name=row.tokenizer)
    _assert_same(_tiny_model(row, tokenizer).double(), _batch(tokenizer), grad_atol=1e-10, loss_rtol=1e-12)


def test_chunked_head_with_lora_on_lm_head_matches_full_logits(one_thread):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    row = next(r for r in ROWS if r.native_class == "Gemma2ForCausalLM")  # soft-capping on top of the LoRA head
    tokenizer = shared_tokenizer(name=row.tokenizer)
    model = get_peft_model(_tiny_model(row, tokenizer, tie_word_embeddings=False),
                           LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    assert type(find_output_head(model)[0].module).__module__.startswith("peft.")
    _assert_same(model, _batch(tokenizer))


def test_unknown_architecture_has_no_chunked_head():
    model = torch.nn.Linear(2, 2)
    head, why = find_output_head(model)
    assert head is None and "Linear is not in automodel's output-head table" in why


class _WidestVocabRows(TorchDispatchMode):
    """Records the most rows of any tensor an op produces whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[-1] == self.vocab:
                self.rows = max(self.rows, tensor.numel() // self.vocab)
        return out


def test_chunked_head_never_materialises_label_tokens_x_vocab(one_thread):  # noqa: F811
    """Llama, hidden 32, the 32,000-token Llama 2 vocabulary, 32 rows: forward + backward of both paths, recording
    every tensor whose last dimension is the vocabulary."""
    row = next(r for r in ROWS if r.native_class == "LlamaForCausalLM")
    tokenizer = shared_tokenizer(name="llama2")
    model = _tiny_model(row, tokenizer, hidden_size=32, intermediate_size=64, head_dim=8).train()
    batch = _batch(tokenizer, rows=32, seq_length=96)
    targets = shift_labels(batch["labels"])
    keep = targets != IGNORE_INDEX
    label_tokens, chunk_size = int(keep.sum()), 40  # more than hidden: W.t() is [hidden x vocab]
    assert label_tokens > 3 * chunk_size

    unchunked = _WidestVocabRows(len(tokenizer))
    with unchunked:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=keep).logits
        MaskedCrossEntropy()(logits, targets[keep]).backward()
    chunked = _WidestVocabRows(len(tokenizer))
    with chunked:
        loss, _ = forward_chunked_loss(model, find_output_head(model)[0], MaskedCrossEntropy(chunk_size), batch,
                                       targets, keep)
        loss.backward()
    assert unchunked.rows >= label_tokens
    assert chunked.rows <= chunk_size


def test_micro_batch_without_labels_gives_zero_loss_and_zero_head_gradients():
    """Every trainable head parameter still gets a gradient (zeros), as DDP expects of every step."""
    from automodel.models.label_rows import OutputHead
    from automodel.training.loss import chunked_head_cross_entropy

    head = OutputHead(torch.nn.Linear(4, 10))
    hidden = torch.zeros(0, 4, requires_grad=True)
    loss = chunked_head_cross_entropy(head, hidden, torch.zeros(0, dtype=torch.long), chunk_size=2)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.shape == (0, 4)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in head.module.parameters())

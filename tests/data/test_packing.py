"""Packing real SQuAD examples: the pretrained stories260K gives each example the same loss packed as alone."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from automodel.data import PadCollator, make_squad_dataset
from automodel.batch import shift_labels
from automodel.data.packing import PackingCollator, build_collator, pack_rows
from automodel.errors import UserError
from automodel.models.capabilities import batch_layouts
from automodel.training.loss import MaskedCrossEntropy
from tests.conftest import SQUAD_DEV, STORIES

# fp32 on CPU: packed and unpacked runs differ only in summation order inside attention.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="module")
def examples(stories_tokenizer):
    ds = make_squad_dataset(stories_tokenizer, str(SQUAD_DEV), seq_length=160, limit_dataset_samples=7,
                            answer_only_loss=False)
    return [ds[i] for i in range(len(ds))]


def per_token_losses(model, input_ids, labels, **inputs):
    """Cross-entropy of every labelled next-token prediction, in order."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, **inputs).logits
    targets = labels[:, 1:]
    mask = targets != -100
    return F.cross_entropy(logits[:, :-1][mask], targets[mask], reduction="none")


def test_packed_rows_give_every_example_its_unpacked_loss(model, examples, stories_tokenizer):
    packed = PackingCollator(stories_tokenizer.pad_token_id, packed_sequence_size=400)(examples)
    rows = pack_rows([len(e["input_ids"]) for e in examples], 400)
    assert len(rows) < len(examples) and all(len(row) >= 2 for row in rows[:-1])
    assert packed["attention_mask"].shape == (len(rows), 1, packed["input_ids"].shape[1], packed["input_ids"].shape[1])
    assert int(packed["padding_mask"].sum()) == sum(len(e["input_ids"]) for e in examples)

    alone = [per_token_losses(model, torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])) for e in examples]
    together = per_token_losses(model, packed["input_ids"], packed["labels"], attention_mask=packed["attention_mask"],
                                position_ids=packed["position_ids"])
    # Row-major order of the packed labels is the examples' order, each example's own predictions in turn.
    torch.testing.assert_close(together, torch.cat(alone), **TOLERANCE)
    # The same through the recipe's loss: the packed batch sums to the unpacked examples' summed loss.
    loss_fn = MaskedCrossEntropy()
    with torch.no_grad():
        summed = loss_fn(model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                               position_ids=packed["position_ids"]).logits, shift_labels(packed["labels"]))
        padded = PadCollator(stories_tokenizer.pad_token_id)(examples)
        reference = loss_fn(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                            shift_labels(padded["labels"]))
    torch.testing.assert_close(summed, reference, **TOLERANCE)


def test_without_the_block_mask_examples_would_leak(model, examples, stories_tokenizer):
    packed = PackingCollator(stories_tokenizer.pad_token_id, packed_sequence_size=400)(examples)
    alone = torch.cat([per_token_losses(model, torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]]))
                       for e in examples])
    # Packed rows under a plain causal mask: later examples attend to earlier ones and get other losses.
    plain_causal = per_token_losses(model, packed["input_ids"], packed["labels"],
                                    attention_mask=torch.ones_like(packed["input_ids"]),
                                    position_ids=packed["position_ids"])
    assert not torch.allclose(plain_causal, alone, **TOLERANCE)


def test_collator_layout_and_errors(examples, stories_tokenizer):
    lengths = [len(e["input_ids"]) for e in examples]
    collator = pickle.loads(pickle.dumps(PackingCollator(0, 400)))
    batch = collator(examples[:3])
    rows = pack_rows(lengths[:3], 400)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            assert batch["input_ids"][r, start:start + n].tolist() == examples[i]["input_ids"]
            assert batch["position_ids"][r, start:start + n].tolist() == list(range(n))
            assert batch["labels"][r, start].item() == -100
            assert batch["labels"][r, start + 1:start + n].tolist() == examples[i]["labels"][1:]
            block = batch["attention_mask"][r, 0, start:start + n, start:start + n]
            assert torch.equal(block, torch.ones(n, n, dtype=torch.bool).tril())
            assert not batch["attention_mask"][r, 0, start:start + n, :start].any()
            start += n
        assert (batch["labels"][r, start:] == -100).all() and (batch["input_ids"][r, start:] == 0).all()
    with pytest.raises(UserError, match=f"an example of {max(lengths)} tokens does not fit in 100"):
        PackingCollator(0, 100)(examples)
    unknown = batch_layouts(None, None)  # a model nothing is known of: padded, packing allowed
    assert isinstance(build_collator(None, 0, unknown), PadCollator)
    assert build_collator({"packed_sequence_size": 256}, 0, batch_layouts("sdpa", "llama")) == PackingCollator(0, 256)
    with pytest.raises(UserError, match="packing needs model.attn_implementation sdpa"):
        build_collator({"packed_sequence_size": 256}, 0, batch_layouts("eager", "llama"))
    with pytest.raises(UserError, match="packed_sequence.packed_sequence_size: expected int"):
        build_collator({"packed_sequence_size": "big"}, 0, unknown)

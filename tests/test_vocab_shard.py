"""FSDP2 with LoRA splits the frozen embedding and untied head by vocabulary rows (distributed/vocab_shard.py):
2 real processes (gloo) against the same model whole in each process. Uneven vocabulary (101 rows: 51 + 50) and a
different number of label rows per process (so a different number of loss chunks) on purpose."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from automodel.training.loss import MaskedCrossEntropy

VOCAB, HIDDEN = 101, 16


def _tiny_lora_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from automodel.peft import LoraSettings

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LoraSettings(target_modules="all-linear", dim=2).apply(LlamaForCausalLM(config))


def _worker(rank, init_file):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from automodel.distributed.env import leave_process_group
    from automodel.distributed.fsdp2 import apply_fsdp2
    from automodel.distributed.vocab_shard import VocabShardedEmbedding, VocabShardedLinear
    from automodel.models.label_rows import find_output_head

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    completed = False
    try:
        torch.set_num_threads(1)
        model = _tiny_lora_model()
        whole = copy.deepcopy(model)
        apply_fsdp2(model, init_device_mesh("cpu", (2,)), torch.device("cpu"))
        base = model.get_base_model()
        embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
        assert type(embedding) is VocabShardedEmbedding and type(head) is VocabShardedLinear
        assert embedding.weight.to_local().shape == head.weight.to_local().shape == ((51, 50)[rank], HIDDEN)

        generator = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, VOCAB, (2, 9), generator=generator)
        assert torch.equal(embedding(ids), whole.get_base_model().get_input_embeddings()(ids))

        # the model's own forward (logits through the split head) and the gradient it sends back to the hidden states
        hidden = torch.randn(2, 5, HIDDEN, generator=generator, requires_grad=True)
        hidden_whole = hidden.detach().clone().requires_grad_()
        logits = head(hidden)
        want = whole.get_base_model().get_output_embeddings()(hidden_whole)
        assert torch.equal(logits, want)  # the gathered head: the same F.linear
        (logits.square().sum()).backward()
        want.square().sum().backward()
        torch.testing.assert_close(hidden.grad, hidden_whole.grad, rtol=1e-5, atol=1e-6)

        # the chunked loss, the whole head gathered once: 7 label rows on rank 0 (3 chunks of 3), 4 on rank 1 (2)
        rows = (7, 4)[rank]
        hidden = torch.randn(rows, HIDDEN, generator=generator, requires_grad=True)
        targets = torch.randint(0, VOCAB, (rows,), generator=generator)
        output_head, why = find_output_head(model)
        assert output_head is not None and output_head.module is head, why
        loss = MaskedCrossEntropy(chunk_size=3).head_loss(output_head, hidden, targets)
        loss.backward()
        hidden_whole = hidden.detach().clone().requires_grad_()
        want = MaskedCrossEntropy(chunk_size=3).head_loss(find_output_head(whole)[0], hidden_whole, targets)
        want.backward()
        unchunked = F.cross_entropy(whole.get_base_model().get_output_embeddings()(hidden_whole.detach()), targets,
                                    reduction="sum")
        torch.testing.assert_close(loss, unchunked, rtol=1e-6, atol=1e-5)
        assert torch.equal(loss, want) and torch.equal(hidden.grad, hidden_whole.grad)
        with torch.no_grad():  # validation: the same sum without gradients
            assert torch.equal(MaskedCrossEntropy(chunk_size=3).head_loss(output_head, hidden, targets), want)
        completed = True
    finally:
        # A rank that tore its group down while the other still used a connection aborted it once in CI
        # (SIGABRT, "terminate called without an active exception"): wait for the peer, as a run's normal end does.
        leave_process_group(wait_for_peers=completed)


def test_frozen_embedding_and_head_split_by_vocabulary_rows_compute_as_whole(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(tmp_path / "init",), nprocs=2, join=True)

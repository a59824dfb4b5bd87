"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the units, in the order they are sharded.

1. Each decoder layer, found through the model's `_no_split_modules` (automodel/models/decoder_layers.py), so no
   model needs a hand-written list: gathered for its forward and backward only.
2. The input embedding, when it is trained and not tied to the output head: gathered for its own forward only,
   instead of being held whole through the step as part of the root.
3. The root (the rest: final norm, output head, a tied embedding). The root's parameters stay gathered from the
   start of the forward to the end of the backward, so FSDP2 sharding a FROZEN root parameter (LoRA's base
   embedding and head) would save nothing at the peak and cost a second full copy while it is gathered. Those are
   kept out of FSDP2 (its `ignored_params`), stored in the dtype the gathered copy would have had, and:
   - a plain frozen nn.Embedding / bias-free nn.Linear (the input embedding, the output head, tied or not) is split
     by vocabulary rows over the processes; the embedding looks up one process's rows at a time, the head is
     assembled in one buffer only while it computes (distributed/vocab_shard.py): a Qwen2-7B-shaped model's
     embedding and untied head are 2.2 GB in bf16, 1.1 GB per process of 2 with this;
   - any other (a final norm, an embedding subclass with its own forward, a head with a LoRA adapter) is replicated.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from automodel.config.precision import Precision
from automodel.distributed.vocab_shard import shard_vocab_modules, vocab_shardable
from automodel.errors import UserError
from automodel.models.decoder_layers import decoder_layers
from automodel.models.unwrap import transformers_model

logger = logging.getLogger("automodel")


def mixed_precision_policy(precision: Precision):
    """Mixed precision (bf16-mixed, bf16-frozen): parameters gathered in the compute dtype, gradients reduced in
    float32. Otherwise parameters are gathered and gradients reduced as stored."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision.mixed:
        return MixedPrecisionPolicy(param_dtype=precision.compute_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp2(model: nn.Module, mesh, device: torch.device, precision: Precision = Precision("fp32", "default"),
                cpu_offload: bool = False, split_vocab: bool = True) -> nn.Module:
    """Shard `model` in place over `mesh` (the data-parallel mesh); returns it for chaining. `split_vocab`: split
    a frozen embedding and output head by vocabulary rows (step 3 of the module docstring); a KD teacher, whose
    head the KD loss reads whole, keeps them replicated."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if cpu_offload and device.type != "cuda":
        raise UserError("distributed.cpu_offload: offloading to the CPU needs a GPU run; this one is on the CPU")
    options = {"mesh": mesh, "mp_policy": mixed_precision_policy(precision),
               "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **options)
    embedding = own_embedding_unit(model)
    if embedding is not None:
        fully_shard(embedding, **options)
    frozen = frozen_root_parameters(model, [*layers, *([embedding] if embedding is not None else [])])
    param_dtype = options["mp_policy"].param_dtype
    base = transformers_model(model)
    by_vocab = [m for m in (base.get_input_embeddings(), base.get_output_embeddings())
                if split_vocab and vocab_shardable(m, frozen)]
    split = {m.weight for m in by_vocab}
    sharded = shard_vocab_modules(by_vocab, mesh, device, lambda p: param_dtype or p.dtype)
    if by_vocab:
        logger.info("FSDP2: the frozen %s split by vocabulary rows over %d processes",
                    " and ".join(sorted({type(m).__name__.removeprefix("VocabSharded") for m in by_vocab})),
                    mesh.size())
    replicated = frozen - split
    for param in replicated:  # on the meta device they are allocated on `device` later, with the model
        param.data = param.data.to(device=param.device if param.is_meta else device,
                                   dtype=param_dtype or param.dtype)
    fully_shard(model, **options, ignored_params=(replicated | sharded) or None)
    return model


def own_embedding_unit(model: nn.Module) -> nn.Module | None:
    """The input embedding when it gets a unit of its own: trained, and not the output head's weight too."""
    base = transformers_model(model)
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
        return None
    if head is not None and getattr(head, "weight", None) is weight:
        return None
    return embedding


def frozen_root_parameters(model: nn.Module, units: list[nn.Module]) -> set[nn.Parameter]:
    """Parameters that no inner unit holds and no optimizer updates."""
    inner = {id(p) for unit in units for p in unit.parameters()}
    return {p for p in model.parameters() if id(p) not in inner and not p.requires_grad}

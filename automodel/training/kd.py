"""The knowledge-distillation recipe: `automodel kd llm -c cfg.yaml` (`recipe: llm_kd`).

The fine-tuning recipe with a frozen teacher: the same sections plus `teacher_model` (any causal LM the model loader
reads), top-level `kd_ratio` and `kd_loss_fn` (`temperature`), NeMo AutoModel's names. The student's loss per label
token is (1 - kd_ratio) x cross-entropy + kd_ratio x T^2 x KL(teacher || student) (automodel/training/kd_loss.py).
Only the forward of a micro-batch differs from fine-tuning (`DistillForwardLoss`); the loop, the step, the
checkpoints and resuming are the fine-tuning recipe's own.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from automodel.batch import IGNORE_INDEX, count_label_tokens, shift_labels
from automodel.errors import UserError
from automodel.logging.summary import StartFacts
from automodel.models.attention import LAST_LAYER_ROWS
from automodel.models.build import build_model
from automodel.models.forward_plan import plan_forward
from automodel.models.unwrap import transformers_model
from automodel.training.kd_loss import KDLoss, chunked_head_distillation
from automodel.training.loss import ForwardLoss, MaskedCrossEntropy, label_hidden_states
from automodel.training.recipe import FinetuneRecipe

logger = logging.getLogger("automodel")


class WholeVocabulary:
    """The run's Parallelism for the student of a KD run: its frozen embedding and output head stay whole under
    FSDP2 (distributed/vocab_shard.py's split gathers the head only on the cross-entropy loss's path, and the KD loss
    reads the student's head as well)."""

    def __init__(self, parallel):
        self.parallel, self.device, self.world_size = parallel, parallel.device, parallel.world_size
        self.precision = parallel.precision

    def shard(self, model: nn.Module) -> nn.Module:
        return self.parallel.shard(model, split_vocab=False)

    def replicate(self, model: nn.Module) -> nn.Module:
        return self.parallel.replicate(model)

    def parallelize(self, model: nn.Module) -> nn.Module:
        return self.replicate(self.shard(model))


class FrozenShard(WholeVocabulary):
    """The teacher's view: WholeVocabulary with parameters frozen before sharding, and never wrapped in DDP, which
    refuses a model with nothing to train (each rank then holds the whole teacher, as DDP would)."""

    def shard(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        return super().shard(model)

    def replicate(self, model: nn.Module) -> nn.Module:
        return model


def build_teacher(node: dict[str, Any], parallel, policy) -> nn.Module:
    """The frozen teacher, built like the student (meta device, each process reading its shard), in eval mode."""
    frozen = FrozenShard(parallel)
    try:
        teacher = build_model({"model": node}, frozen, policy=policy, lora=None)
    except UserError as err:  # the model builder names its keys `model.*`; here they are the teacher's
        message = str(err)
        raise UserError("teacher_model" + message[len("model"):] if message.startswith(("model.", "model:"))
                        else message) from None
    teacher.requires_grad_(False)
    return teacher.eval()


def check_same_vocabulary(student: nn.Module, teacher: nn.Module) -> None:
    student_size = transformers_model(student).config.vocab_size
    teacher_size = transformers_model(teacher).config.vocab_size
    if student_size != teacher_size:
        raise UserError(f"teacher_model: its vocabulary has {teacher_size:,} tokens, the student's (model) "
                        f"{student_size:,}: KD compares their distributions token by token, so both need the same "
                        "tokenizer vocabulary")


class DistillForwardLoss:
    """One micro-batch -> ((1 - kd_ratio) x CE + kd_ratio x KD summed over label tokens, label tokens). The teacher
    runs first, under no_grad: its last hidden state at the label positions is all that is kept of it. In eval mode
    the returned loss is the pure cross-entropy (validation compares with fine-tuning); the CE and KD sums of every
    call are kept for the step record and validation (`pop_sums`)."""

    def __init__(self, student: ForwardLoss, teacher: ForwardLoss, kd_loss: KDLoss, kd_ratio: float):
        for role, forward in (("model", student), ("teacher_model", teacher)):
            if forward.output_head is None:
                raise UserError(f"{role}: {type(transformers_model(forward.model)).__name__} has no chunked output "
                                "head (automodel/models/label_rows.py); KD computes both models' logits a chunk "
                                "of label tokens at a time and needs one")
        self.student, self.teacher, self.kd_loss, self.kd_ratio = student, teacher, kd_loss, kd_ratio
        self.router_aux = student.router_aux
        self.model = student.model
        self._sums = [0.0, 0.0, 0]

    def describe(self) -> str:
        return (f"{1 - self.kd_ratio:g} x cross-entropy + {self.kd_ratio:g} x KD (T={self.kd_loss.temperature:g}, "
                f"{self.kd_loss.chunk_size} label tokens a chunk); {self.student.describe()}")

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        targets = shift_labels(batch["labels"])
        keep = targets != IGNORE_INDEX
        with torch.no_grad():
            teacher_hidden, _ = label_hidden_states(self.teacher.model, batch, keep, **self._rows(self.teacher, keep))
        hidden, output = label_hidden_states(self.student.model, batch, keep, **self._rows(self.student, keep))
        weighted, ce, kd = chunked_head_distillation(self.student.output_head, hidden, targets[keep],
                                                     self.teacher.output_head, teacher_hidden, self.kd_loss,
                                                     self.kd_ratio)
        tokens = count_label_tokens(batch["labels"])
        self._sums = [self._sums[0] + ce.item(), self._sums[1] + kd.item(), self._sums[2] + tokens]
        if not self.model.training:
            return ce, tokens
        if self.router_aux is not None:
            weighted = self.router_aux.add(weighted, output, batch["labels"])
        return weighted, tokens

    @staticmethod
    def _rows(forward: ForwardLoss, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        return {LAST_LAYER_ROWS: keep} if forward.last_layer_rows else {}

    def pop_sums(self) -> tuple[float, float, int]:
        """(CE sum, KD sum, label tokens) of the calls since the last pop, this rank's."""
        sums, self._sums = tuple(self._sums), [0.0, 0.0, 0]
        return sums


class KDRecipe(FinetuneRecipe):
    """Fine-tune a student (LoRA or full) against a frozen teacher's distribution as well as the labels. The teacher
    belongs to the micro-batch forward (`parts.forward_loss.teacher`), built in `build_forward_loss`."""

    recipe_name = "llm_kd"

    def build_model(self, parallel) -> nn.Module:
        return build_model(self.cfg, WholeVocabulary(parallel), policy=self.settings.targets, lora=self.settings.peft)

    def build_forward_loss(self, model: nn.Module, loss_fn, parallel) -> DistillForwardLoss:
        kd = self.settings.kd
        if type(loss_fn) is not MaskedCrossEntropy:
            raise UserError("loss_fn._target_: the kd recipe computes the cross-entropy with the KD term from the "
                            "same chunk of logits: use automodel.training.loss.MaskedCrossEntropy (the default)")
        teacher = build_teacher(kd.teacher, parallel, self.settings.targets)
        check_same_vocabulary(model, teacher)
        # The teacher gets the forward's plan (label positions, last layer on label rows, its output head) too.
        teacher_loss = MaskedCrossEntropy(kd.kd_loss.chunk_size)
        teacher_forward = ForwardLoss(teacher, teacher_loss, plan_forward(teacher, teacher_loss))
        return DistillForwardLoss(super().build_forward_loss(model, loss_fn, parallel), teacher_forward, kd.kd_loss,
                                  kd.kd_ratio)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        record = super().train_step(micro_batches)
        ce, kd, tokens = self.parts.parallel.all_reduce_sum(*self.parts.forward_loss.pop_sums())
        return {**record, "ce_loss": ce / max(tokens, 1), "kd_loss": kd / max(tokens, 1)}

    @torch.no_grad()
    def validate(self, step: int) -> float:
        """The validation cross-entropy (as fine-tuning reports it), and the KD term to the teacher over the same
        label tokens."""
        self.parts.forward_loss.pop_sums()
        val_loss = super().validate(step)
        _, kd, tokens = self.parts.parallel.all_reduce_sum(*self.parts.forward_loss.pop_sums())
        kd_loss = kd / max(tokens, 1)
        self.parts.metrics.write({"kind": "validation_kd", "step": step, "val_kd_loss": kd_loss})
        logger.info("step %d | validation KD to the teacher %.4f (T^2 x KL per label token)", step, kd_loss)
        return val_loss

    def start_facts(self) -> StartFacts:
        node = self.settings.kd.teacher
        source = str(node.get("pretrained_model_name_or_path", "?"))
        if node.get("gguf_file"):  # name the file it was read from, not only its folder (models/gguf.py)
            source = f"{source.rstrip('/')}/{node['gguf_file']}"
        teacher = self.parts.forward_loss.teacher.model
        parameters = sum(p.numel() for p in teacher.parameters())
        return replace(super().start_facts(), command="automodel kd llm",
                       extra=(("teacher", f"{source} (frozen, {parameters:,} parameters, {held_as(teacher)})"),))


def held_as(model: nn.Module) -> str:
    """How this process holds `model`'s parameters, read from the parameters themselves: whole, or how many are
    split over each mesh dimension (FSDP2's `dp`, tensor parallel's `tp`), so the banner shows the teacher sharded
    like the student."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    split = Counter(f"{name} ({size} processes)" for param in params if isinstance(param, DTensor)
                    for name, size, placement in zip(param.device_mesh.mesh_dim_names, param.device_mesh.shape,
                                                     param.placements) if placement.is_shard())
    if not split:
        return "held whole by each process"
    return ", ".join(f"{count} of {len(params)} tensors split over {dim}" for dim, count in split.items())

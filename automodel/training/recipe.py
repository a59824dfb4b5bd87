"""The fine-tuning recipe: config -> model -> data -> step -> checkpoint, as one readable loop.

`FinetuneRecipe(cfg).run()` is what `automodel finetune llm -c cfg.yaml` does. Each piece is built
by its own module (models/, peft/, data/, training/, checkpoint/); this file only wires them together
in the order a reader expects.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from automodel.batch import count_label_tokens, count_tokens
from automodel.checkpoint import (
    TrainState,
    check_compatible,
    find_restore_dir,
    load_training_state,
    save_checkpoint,
    write_config,
)
from automodel.checkpoint.provenance import check_trusted
from automodel.config import build, config_at_rest
from automodel.data.loaders import RankBatches, build_dataset, build_loader
from automodel.data.streaming import is_streaming
from automodel.distributed.env import leave_process_group
from automodel.distributed.parallel import Parallelism, clip_grad_norm, mask_rows_after
from automodel.errors import TrainingStopped, UserError
from automodel.logging import (
    format_end_summary,
    format_start_banner,
    is_main_process,
    open_metrics,
    progress_bar,
    throughput_meter,
)
from automodel.logging.summary import StartFacts
from automodel.models.build import build_model, model_section
from automodel.models.capabilities import model_batch_layouts
from automodel.models.forward_plan import plan_forward
from automodel.models.unwrap import transformers_model
from automodel.training import host_memory
from automodel.training.loss import ForwardLoss
from automodel.training.preemption import PreemptionHandler
from automodel.training.settings import RecipeParts, RecipeSettings, RunData
from automodel.training.step_scheduler import StepSchedulerConfig
from automodel.training.tokenizer import build_tokenizer

logger = logging.getLogger("automodel")

DEFAULT_TARGETS = {
    "model": "automodel.models.load_causal_lm",
    "optimizer": "torch.optim.AdamW",
    "loss_fn": "automodel.training.loss.MaskedCrossEntropy",
}


def with_default_target(cfg: dict, section: str) -> dict:
    node = dict(cfg.get(section) or {})
    node.setdefault("_target_", DEFAULT_TARGETS[section])
    return node


@dataclass
class RunResult:
    """What a finished run reports (the CLI prints it; tests assert on it)."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    final_dir: Path | None = None
    steps: int = 0
    preempted: bool = False


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device), as transformers' `set_seed` does. Not taken
    from there: importing it loads `transformers.trainer_utils`, and with it peft, which full SFT never uses."""
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


class FinetuneRecipe:
    """Fine-tune a causal LM with LoRA (when a `peft` section is present) or full SFT.

    Holds `settings` (every section, parsed and checked: training/settings.py) from construction, `parts` (model,
    data, loss, optimizer, scheduler, parallelism, monitoring: built once by `setup`) and `state` (the step counters a
    checkpoint restores)."""

    recipe_name = "llm_finetune"

    def __init__(self, cfg: dict[str, Any], allow_targets: tuple[str, ...] = (),
                 unresolved: dict[str, Any] | None = None):
        """`cfg` is the resolved config; `unresolved` the same before `${oc.env:...}` interpolation (the CLI's),
        which is what gets written down (config/redact.py: no secrets at rest). Builds nothing."""
        self.settings = RecipeSettings.from_config(cfg, self.recipe_name, allow_targets)
        self.cfg = cfg
        self.cfg_at_rest = config_at_rest(cfg if unresolved is None else unresolved)
        self.out_dir = Path(self.settings.checkpoint.checkpoint_dir)

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Join the process group (when launched with several), build the parts, restore a checkpoint."""
        settings, targets = self.settings, self.settings.targets
        parallel = Parallelism.start(self.cfg, settings.distributed, settings.dist_env)
        grad_acc = settings.steps.grad_accumulation_steps(parallel.dp_size)
        seed_everything(settings.seed)
        # The model's tokenizer unless `tokenizer:` or `dataset.tokenizer` names another (with its options).
        tokenizer = build_tokenizer(self.cfg, targets)
        model = self.build_model(parallel)
        loss_fn = build(with_default_target(self.cfg, "loss_fn"), "loss_fn", policy=targets)
        forward_loss = self.build_forward_loss(model, loss_fn, parallel)
        data = self.build_data(tokenizer, model, parallel, grad_acc)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build(with_default_target(self.cfg, "optimizer"), "optimizer", policy=targets, params=params)
        lr_scheduler = settings.lr.build(optimizer, data.max_steps)
        self.state = self._restore(model, optimizer, lr_scheduler, data.max_steps, parallel)
        self.start_step = self.last_saved_step = self.state.step
        if parallel.is_main:  # only rank 0 writes
            write_config(self.cfg_at_rest, self.out_dir / "config.yaml")
        metrics = open_metrics(settings.logging, self.out_dir, self.cfg_at_rest, resume_step=self.state.step)
        self.parts = RecipeParts(parallel, tokenizer, model, forward_loss, data, optimizer, lr_scheduler, grad_acc,
                                 metrics, throughput_meter(model, parallel.device, settings.logging))
        if is_main_process():
            logger.info("%s", format_start_banner(self.start_facts()))

    def build_model(self, parallel: Parallelism) -> nn.Module:
        """The configured model: built from `model`, LoRA applied when `peft` is set, spread over the processes
        (models/build.py: on the meta device, each process then loading only its shard)."""
        return build_model(self.cfg, parallel, policy=self.settings.targets, lora=self.settings.peft)

    def build_forward_loss(self, model: nn.Module, loss_fn, parallel: Parallelism) -> ForwardLoss:
        """The forward of one micro-batch, with the optimisations decided once for this model and loss (the last
        layer's row hooks installed: models/forward_plan.py)."""
        return ForwardLoss(model, loss_fn, plan_forward(model, loss_fn))

    def build_data(self, tokenizer, model: nn.Module, parallel: Parallelism, grad_acc: int) -> RunData:
        """The datasets, their loaders for this rank, and the run length they give."""
        targets, steps = self.settings.targets, self.settings.steps
        train_set = build_dataset(self.cfg, "dataset", targets, tokenizer)
        val_set = build_dataset(self.cfg, "validation_dataset", targets, tokenizer) \
            if self.cfg.get("validation_dataset") else None

        def loader(dataset, section: str, train: bool):
            batches = RankBatches(steps.local_batch_size, steps.global_batch_size, parallel.dp_size,
                                  parallel.dp_rank, self.settings.seed)
            return build_loader(self.cfg, section, dataset, train, targets, tokenizer.pad_token_id,
                                model_batch_layouts(transformers_model(model).config, parallel.device.type), batches)

        train_loader = loader(train_set, "dataloader", train=True)
        val_loader = loader(val_set, "validation_dataloader", train=False) if val_set is not None else None
        # A stream has no length: max_steps sets the run length and an epoch ends when the stream runs out.
        streaming = is_streaming(train_set)
        steps_per_epoch = None if streaming else len(train_loader) // grad_acc
        max_steps, why = steps.streaming_total_steps() if streaming else steps.total_steps(steps_per_epoch)
        return RunData(train_set, train_loader, val_set, val_loader, streaming, steps_per_epoch, max_steps, why)

    def _restore(self, model, optimizer, lr_scheduler, max_steps: int, parallel: Parallelism) -> TrainState:
        """Continue from `checkpoint.restore_from` (default: the newest complete checkpoint, if any)."""
        ckpt = self.settings.checkpoint
        step_dir = find_restore_dir(ckpt.checkpoint_dir, ckpt.restore_from) if ckpt.enabled else None
        self.restored_from = step_dir
        if step_dir is None:
            return TrainState()
        check_compatible(step_dir, self.cfg)
        check_trusted(step_dir, ckpt.trust_pickled_state, "checkpoint.restore_from",
                      "run with --checkpoint.trust_pickled_state true",
                      share=(parallel.dp_rank, parallel.dp_size),  # each process hashes its share
                      agree=lambda flags: [int(n) for n in parallel.all_reduce_sum(*flags)])
        if ckpt.trust_pickled_state:
            logger.warning("checkpoint.trust_pickled_state: loading %s/dcp with pickle, trusted by you", step_dir)
        state = load_training_state(step_dir, model, optimizer, lr_scheduler)
        if state.step >= max_steps:
            logger.info("checkpoint %s is at step %d, max_steps is %d: nothing left to train", step_dir,
                        state.step, max_steps)
        else:
            logger.info("resuming from %s: step %d, epoch %d", step_dir, state.step, state.epoch)
        return state

    def start_facts(self) -> StartFacts:
        """What the start banner says about this run."""
        parts, steps = self.parts, self.settings.steps
        return StartFacts(
            command="automodel finetune llm", model_source=str(model_section(self.cfg).get(
                "pretrained_model_name_or_path", "?")), lora=self.settings.peft is not None, model=parts.model,
            train_set=parts.data.train_set, val_set=parts.data.val_set,
            batch=(f"{steps.global_batch_size} per step = {steps.local_batch_size} per micro-batch x "
                   f"{parts.grad_acc} accumulation x {parts.parallel.dp_size} data-parallel"),
            steps=f"{parts.data.max_steps}: {parts.data.steps_reason}", parallel=parts.parallel,
            loss=parts.forward_loss.describe(), output=self.out_dir)

    # ---- training -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        try:
            self.setup()
            result = self.train()
        except BaseException:
            leave_process_group(wait_for_peers=False)  # the error, not a gloo abort at exit, ends the process
            raise
        self.parts.parallel.shutdown()
        return result

    def train(self) -> RunResult:
        """The loop: epochs of steps until max_steps (or num_epochs, or a stream's end, or a preemption signal)."""
        parts, steps, state = self.parts, self.settings.steps, self.state
        max_steps, result = parts.data.max_steps, RunResult(final_dir=self.restored_from, steps=state.step)
        bar = progress_bar(max_steps, "training", self.settings.logging.progress_bar, initial=state.step, unit="step")
        with parts.metrics, logging_redirect_tqdm(), PreemptionHandler() as preemption:
            host_memory.training_steps()  # setup is done: what it freed goes back, steps reuse their buffers
            if steps.val_generate_at_start and state.step == 0:
                self._score_the_base_model(result)
            while state.step < max_steps and not result.preempted and not self._epochs_done():
                batches = self._epoch_batches()
                epoch_done = False
                while not epoch_done and state.step < max_steps:
                    micro_batches = self._next_micro_batches(batches)
                    if micro_batches is None:  # a stream ran out: the epoch ends, its partial step is dropped
                        self._end_stream_epoch()
                        break
                    record = self.train_step(micro_batches)
                    record["epoch"] = state.epoch
                    epoch_done = self._advance()
                    result.train_losses.append(record["loss"])
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", epoch=record["epoch"],
                                    tokens_per_s=f"{record['tokens_per_s']:,.0f}")
                    self._after_step(record, result)
                    if self._agreed(preemption.requested):
                        self._stop_for_preemption(result)
                        break
        bar.close()
        result.steps = state.step
        if not result.preempted and is_main_process():
            plot = parts.metrics.plot() if self.settings.logging.plot else None
            logger.info("%s", format_end_summary(result, parts.metrics.elapsed(), parts.throughput.run_rates(),
                                                 self.out_dir, plot))
        return result

    def _epoch_batches(self):
        """An iterator over this epoch's micro-batches, starting after the ones finished steps already used."""
        data, state = self.parts.data, self.state
        used = state.step_in_epoch * self.parts.grad_acc * self.settings.steps.local_batch_size
        if data.streaming:
            data.train_loader.dataset.set_position(state.epoch, used * self.parts.parallel.dp_size)
        else:
            data.train_loader.sampler.set_epoch(state.epoch)
            data.train_loader.sampler.load_state_dict({"yielded": used})
        return iter(data.train_loader)

    def _epochs_done(self) -> bool:
        epochs = self.settings.steps.num_epochs
        return epochs is not None and self.state.epoch >= epochs

    def _next_micro_batches(self, batches) -> list[dict[str, torch.Tensor]] | None:
        """The next step's micro-batches, or None when a stream ran out on any rank (all ranks agree)."""
        grad_acc = self.parts.grad_acc
        if not self.parts.data.streaming:  # the sampler's length already ends the epoch on a whole step
            return [next(batches) for _ in range(grad_acc)]
        micro_batches = list(itertools.islice(batches, grad_acc))
        return None if self._agreed(len(micro_batches) < grad_acc) else micro_batches

    def _end_stream_epoch(self) -> None:
        state = self.state
        if state.step_in_epoch == 0:
            raise UserError(f"dataset: the stream holds fewer than global_batch_size="
                            f"{self.settings.steps.global_batch_size} examples (epoch {state.epoch}); lower "
                            "global_batch_size or add data")
        logger.info("epoch %d: the stream ran out after %d steps", state.epoch, state.step_in_epoch)
        state.epoch, state.step_in_epoch = state.epoch + 1, 0

    def _advance(self) -> bool:
        """Count a finished step; True when it ended the epoch (the state then points at the next one)."""
        state = self.state
        state.step += 1
        state.step_in_epoch += 1
        if state.step_in_epoch == self.parts.data.steps_per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            return True
        return False

    def _agreed(self, flag) -> bool:
        """True on every rank when any rank saw `flag` (a signal may reach the ranks between different steps)."""
        (count,) = self.parts.parallel.all_reduce_sum(1 if flag else 0)
        return count > 0

    def _stop_for_preemption(self, result: RunResult) -> None:
        step = self.state.step
        if self.settings.checkpoint.enabled and self.last_saved_step != step:
            result.final_dir = self.save(step)
        result.preempted = True
        where = f"{result.final_dir}" if result.final_dir else "nowhere (checkpointing is disabled)"
        logger.info("preempted at step %d: saved to %s; run the same command again to resume", step, where)

    def _after_step(self, record: dict, result: RunResult) -> None:
        """Log, validate, score by generation and save, each when it is due."""
        parts, steps, step, due = self.parts, self.settings.steps, self.state.step, StepSchedulerConfig.due
        max_steps = parts.data.max_steps
        parts.throughput.add(record)
        if step % steps.log_every_steps == 0 or step == max_steps:
            elapsed = parts.metrics.elapsed()
            record.update(step=step, elapsed_s=elapsed, eta_s=elapsed / (step - self.start_step) * (max_steps - step))
            record.update(parts.throughput.window_rates())
            parts.metrics.log_train(record, max_steps)
        if parts.data.val_loader is not None and due(steps.val_every_steps, step, max_steps):
            result.val_losses[step] = self.validate(step)
        if steps.val_generate_every_steps and due(steps.val_generate_every_steps, step, max_steps):
            self._generate_on_validation(step)
        if self.settings.checkpoint.enabled and due(steps.ckpt_every_steps, step, max_steps):
            result.final_dir = self.save(step)
            self.last_saved_step = step

    def _score_the_base_model(self, result: RunResult) -> None:
        """Step 0, before any update: the validation loss and the generation scores the run is compared with."""
        if self.parts.data.val_loader is not None:
            result.val_losses[0] = self.validate(0)
        self._generate_on_validation(0)

    def _generate_on_validation(self, step: int) -> None:
        parts = self.parts
        if parts.data.val_set is None:
            return
        from automodel.inference.squad_eval import squad_eval_during_training

        with parts.parallel.forward_context():
            squad_eval_during_training(parts.model, parts.tokenizer, parts.data.val_set, step, parts.metrics)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `grad_acc` micro-batches."""
        parts = self.parts
        start = time.perf_counter()
        parts.model.train()
        loss_sum, label_tokens = self.backward(micro_batches)
        grad_norm = clip_grad_norm([p for p in parts.model.parameters() if p.requires_grad],
                                   self.settings.max_grad_norm or math.inf)
        lr = parts.optimizer.param_groups[0]["lr"]
        loss = loss_sum / max(label_tokens, 1)
        if math.isfinite(loss) and math.isfinite(float(grad_norm)):
            parts.optimizer.step()
        else:
            self._on_nonfinite(loss, float(grad_norm))
        parts.lr_scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
        (tokens,) = parts.parallel.all_reduce_sum(sum(count_tokens(b) for b in micro_batches))
        seconds = time.perf_counter() - start
        router_aux = parts.forward_loss.router_aux
        return {"loss": loss, "grad_norm": float(grad_norm), "lr": lr, "tokens": int(tokens),
                "label_tokens": label_tokens, "tokens_per_s": tokens / seconds, "step_s": seconds,
                **(router_aux.pop_metrics() if router_aux is not None else {})}

    def _on_nonfinite(self, loss: float, grad_norm: float) -> None:
        """`skip`: drop this update (the schedule still advances); `stop`: end the run, saving nothing new."""
        step, state, steps = self.state.step + 1, self.state, self.settings.steps
        per_step = self.parts.grad_acc * steps.local_batch_size
        first = state.step_in_epoch * per_step
        where = (f"step {step} (epoch {state.epoch}, samples {first}-{first + per_step - 1} of this rank's "
                 f"seeded epoch order): loss {loss}, grad norm {grad_norm}")
        if steps.on_nonfinite == "skip":
            logger.warning("non-finite values at %s: skipping this update", where)
            return
        latest = find_restore_dir(self.settings.checkpoint.checkpoint_dir, "LATEST")
        raise TrainingStopped(f"non-finite values at {where}; stopped without saving (step_scheduler.on_nonfinite"
                              f"=stop). Last checkpoint: {latest or 'none'}")

    def backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """Accumulate gradients of (summed loss / label tokens of the whole step, all ranks): the gradient one batch
        holding all micro-batches of all data-parallel ranks would give. DDP and FSDP2 average gradients over the
        ranks, so each rank's loss is scaled by dp_size. Returns (summed loss, label tokens), both over all ranks."""
        parallel, model = self.parts.parallel, self.parts.model
        (label_tokens,) = parallel.all_reduce_sum(sum(count_label_tokens(b["labels"]) for b in micro_batches))
        scale = parallel.dp_size / max(label_tokens, 1)
        loss_sum = torch.zeros((), device=parallel.device)
        for index, batch in enumerate(micro_batches):
            batch = {k: v.to(parallel.device, non_blocking=True) for k, v in batch.items()}
            with parallel.gradient_sync(model, enabled=index == len(micro_batches) - 1):
                with parallel.forward_context():
                    summed, _ = self.parts.forward_loss(batch)
                (summed * scale).backward()
            loss_sum += summed.detach()
        (loss_sum,) = parallel.all_reduce_sum(loss_sum.item())
        return loss_sum, int(label_tokens)

    @torch.no_grad()
    def validate(self, step: int) -> float:
        """Token-weighted validation loss over the whole validation set."""
        parts = self.parts
        parts.model.eval()
        loss_sum, tokens, seen = 0.0, 0, 0
        real_rows = parts.parallel.dp_shard_size(len(parts.data.val_set))
        for batch in progress_bar(len(parts.data.val_loader), "validation", self.settings.logging.progress_bar,
                                  leave=False, iterable=parts.data.val_loader):
            # The sampler pads the last ranks with repeated rows so all run the same batches; they do not count.
            batch, seen = mask_rows_after(batch, real_rows - seen), seen + len(batch["labels"])
            batch = {k: v.to(parts.parallel.device) for k, v in batch.items()}
            with parts.parallel.forward_context():
                summed, label_tokens = parts.forward_loss(batch)
            loss_sum, tokens = loss_sum + summed.item(), tokens + label_tokens
        loss_sum, tokens = parts.parallel.all_reduce_sum(loss_sum, tokens)
        tokens = int(tokens)
        val_loss = loss_sum / max(tokens, 1)
        parts.metrics.log_validation(step, val_loss, tokens)
        return val_loss

    def save(self, step: int) -> Path | None:
        """Every rank calls this: training state always (sharded), the HF `model/` folder as
        `checkpoint.save_consolidated` asks. Rank 0 publishes the step folder and gets its path."""
        parts, ckpt = self.parts, self.settings.checkpoint
        consolidated = ckpt.save_consolidated == "every" or (
            ckpt.save_consolidated == "final" and step == parts.data.max_steps)
        with host_memory.saving():
            return save_checkpoint(parts.parallel, parts.model, parts.tokenizer, self.cfg_at_rest, self.out_dir, step,
                                   optimizer=parts.optimizer, lr_scheduler=parts.lr_scheduler, state=self.state,
                                   consolidated=consolidated, keep_last_n=ckpt.keep_last_n,
                                   max_shard_size=ckpt.max_shard_size)

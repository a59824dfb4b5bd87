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
from tqdm.contrib.logging import logging_redirect_tqdm

from automodel.batch import count_label_tokens, count_tokens
from automodel.checkpoint import (
    CheckpointConfig,
    TrainState,
    check_compatible,
    check_no_links,
    find_restore_dir,
    load_training_state,
    save_checkpoint,
    write_config,
)
from automodel.checkpoint.provenance import check_trusted
from automodel.config import build, check_sections, check_targets, config_at_rest, parse_section, target_policy
from automodel.data.loaders import RankBatches, build_dataset, build_loader
from automodel.data.streaming import is_streaming
from automodel.distributed.grad_norm import clip_grad_norm
from automodel.distributed.parallel import Parallelism, mask_rows_after
from automodel.errors import TrainingStopped, UserError
from automodel.logging import (
    LoggingConfig,
    format_end_summary,
    format_start_banner,
    is_main_process,
    open_metrics,
    progress_bar,
    throughput_meter,
)
from automodel.models.build import build_model
from automodel.models.capabilities import model_batch_layouts
from automodel.models.forward_plan import plan_forward
from automodel.models.unwrap import transformers_model
from automodel.peft import LoraSettings
from automodel.training import host_memory
from automodel.training.forward import ForwardLoss
from automodel.training.lr_scheduler import LRSchedulerConfig
from automodel.training.preemption import PreemptionHandler
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
    """Fine-tune a causal LM with LoRA (when a `peft` section is present) or full SFT."""

    def __init__(self, cfg: dict[str, Any], allow_targets: tuple[str, ...] = (),
                 unresolved: dict[str, Any] | None = None):
        """`cfg` is the resolved config; `unresolved` the same before `${oc.env:...}` interpolation (the CLI's),
        which is what gets written down (config/redact.py: no secrets at rest)."""
        check_sections(cfg)
        # Every `_target_` is checked before anything is built or imported (config/trust.py).
        self.targets = target_policy(cfg, allow_targets)
        check_targets(cfg, self.targets)
        self.cfg = cfg
        self.cfg_at_rest = config_at_rest(cfg if unresolved is None else unresolved)
        self.parallel = Parallelism.from_config(cfg)  # joins torchrun's / srun's process group when launched
        self.dp_size, self.dp_rank = self.parallel.dp_size, self.parallel.dp_rank
        self.device = self.parallel.device
        self.precision = self.parallel.precision  # decided once (config/precision.py); every forward follows it
        self.steps = parse_section(StepSchedulerConfig, cfg.get("step_scheduler"), "step_scheduler")
        self.lr_cfg = parse_section(LRSchedulerConfig, cfg.get("lr_scheduler"), "lr_scheduler")
        self.ckpt_cfg = parse_section(CheckpointConfig, cfg.get("checkpoint"), "checkpoint")
        self.log_cfg = parse_section(LoggingConfig, cfg.get("logging"), "logging")
        check_no_links(self.ckpt_cfg.checkpoint_dir, (self.log_cfg.metrics_file,))
        self.peft_cfg = parse_section(LoraSettings, cfg["peft"], "peft") if cfg.get("peft") is not None else None
        self.clip_grad_norm = self._max_grad_norm(cfg.get("clip_grad_norm"))
        self.grad_acc = self.steps.grad_accumulation_steps(self.dp_size)
        if "dataset" not in cfg:
            raise UserError("config has no 'dataset' section: name a _target_ builder such as "
                            "automodel.data.squad.make_squad_dataset")

    @staticmethod
    def _max_grad_norm(node: Any) -> float | None:
        value = node.get("max_norm") if isinstance(node, dict) else node
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise UserError(f"clip_grad_norm.max_norm: expected a positive number or null, got {value!r}")
        return value

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        seed_everything(int(self.cfg.get("seed", 42)))
        # The model's tokenizer unless `tokenizer:` or `dataset.tokenizer` names another (with its options).
        self.tokenizer = build_tokenizer(self.cfg, self.targets)
        self.model = self.build_model()
        self.loss_fn = build(with_default_target(self.cfg, "loss_fn"), "loss_fn", policy=self.targets)
        # The forward's optimisations for this model and loss, decided once (the last layer's row hooks installed).
        self.forward_plan = plan_forward(self.model, self.loss_fn)
        self.forward_loss = ForwardLoss(self.model, self.loss_fn, self.forward_plan)
        self.train_set = build_dataset(self.cfg, "dataset", self.targets, self.tokenizer)
        self.streaming = is_streaming(self.train_set)
        self.val_set = build_dataset(self.cfg, "validation_dataset", self.targets, self.tokenizer) \
            if self.cfg.get("validation_dataset") else None
        self.train_loader = self._build_loader(self.train_set, "dataloader", train=True)
        self.val_loader = self._build_loader(self.val_set, "validation_dataloader", train=False) \
            if self.val_set is not None else None
        # A stream has no length: max_steps sets the run length and an epoch ends when the stream runs out.
        self.steps_per_epoch = None if self.streaming else len(self.train_loader) // self.grad_acc
        self.max_steps, why = self.steps.streaming_total_steps() if self.streaming \
            else self.steps.total_steps(self.steps_per_epoch)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build(with_default_target(self.cfg, "optimizer"), "optimizer", policy=self.targets,
                               params=self.params)
        self.lr_scheduler = self.lr_cfg.build(self.optimizer, self.max_steps)
        self.out_dir = Path(self.ckpt_cfg.checkpoint_dir)
        self.state = self._restore()
        self.start_step = self.last_saved_step = self.state.step
        if self.parallel.is_main:  # only rank 0 writes
            write_config(self.cfg_at_rest, self.out_dir / "config.yaml")
        self.metrics = open_metrics(self.log_cfg, self.out_dir, self.cfg_at_rest, resume_step=self.state.step)
        self.throughput = throughput_meter(self.model, self.device, self.log_cfg)
        if is_main_process():
            logger.info("%s", format_start_banner(self, why))

    def _restore(self) -> TrainState:
        """Continue from `checkpoint.restore_from` (default: the newest complete checkpoint, if any)."""
        step_dir = find_restore_dir(self.ckpt_cfg.checkpoint_dir, self.ckpt_cfg.restore_from) \
            if self.ckpt_cfg.enabled else None
        self.restored_from = step_dir
        if step_dir is None:
            return TrainState()
        check_compatible(step_dir, self.cfg)
        check_trusted(step_dir, self.ckpt_cfg.trust_pickled_state, "checkpoint.restore_from",
                      "run with --checkpoint.trust_pickled_state true",
                      share=(self.parallel.dp_rank, self.parallel.dp_size),  # each process hashes its share
                      agree=lambda flags: [int(n) for n in self.parallel.all_reduce_sum(*flags)])
        if self.ckpt_cfg.trust_pickled_state:
            logger.warning("checkpoint.trust_pickled_state: loading %s/dcp with pickle, trusted by you", step_dir)
        state = load_training_state(step_dir, self.model, self.optimizer, self.lr_scheduler)
        if state.step >= self.max_steps:
            logger.info("checkpoint %s is at step %d, max_steps is %d: nothing left to train", step_dir,
                        state.step, self.max_steps)
        else:
            logger.info("resuming from %s: step %d, epoch %d", step_dir, state.step, state.epoch)
        return state

    def build_model(self):
        """The configured model: built from `model`, LoRA applied when `peft` is set, spread over the processes
        (models/build.py: on the meta device, each process then loading only its shard)."""
        return build_model(self.cfg, self.parallel, policy=self.targets)

    def _build_loader(self, dataset, section: str, train: bool):
        batches = RankBatches(self.steps.local_batch_size, self.steps.global_batch_size, self.dp_size, self.dp_rank,
                              int(self.cfg.get("seed", 42)))
        return build_loader(self.cfg, section, dataset, train, self.targets, self.tokenizer.pad_token_id,
                            model_batch_layouts(transformers_model(self.model).config, self.device.type), batches)

    # ---- training -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        self.setup()
        result = self.train()
        self.parallel.shutdown()
        return result

    def train(self) -> RunResult:
        state, result = self.state, RunResult(final_dir=self.restored_from, steps=self.state.step)
        bar = progress_bar(self.max_steps, "training", self.log_cfg.progress_bar, initial=state.step, unit="step")
        with self.metrics, logging_redirect_tqdm(), PreemptionHandler() as preemption:
            host_memory.training_steps()  # setup is done: what it freed goes back, steps reuse their buffers
            if self.steps.val_generate_at_start and state.step == 0:
                self._score_the_base_model(result)
            while state.step < self.max_steps and not result.preempted and not self._epochs_done():
                batches = self._epoch_batches()
                epoch_done = False
                while not epoch_done and state.step < self.max_steps:
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
            plot = self.metrics.plot() if self.log_cfg.plot else None
            logger.info("%s", format_end_summary(result, self.metrics.elapsed(), self.throughput.run_rates(),
                                                 self.out_dir, plot))
        return result

    def _epoch_batches(self):
        """An iterator over this epoch's micro-batches, starting after the ones finished steps already used."""
        used = self.state.step_in_epoch * self.grad_acc * self.steps.local_batch_size
        if self.streaming:
            self.train_loader.dataset.set_position(self.state.epoch, used * self.dp_size)
        else:
            self.train_loader.sampler.set_epoch(self.state.epoch)
            self.train_loader.sampler.load_state_dict({"yielded": used})
        return iter(self.train_loader)

    def _epochs_done(self) -> bool:
        return self.steps.num_epochs is not None and self.state.epoch >= self.steps.num_epochs

    def _next_micro_batches(self, batches) -> list[dict[str, torch.Tensor]] | None:
        """The next step's micro-batches, or None when a stream ran out on any rank (all ranks agree)."""
        if not self.streaming:  # the sampler's length already ends the epoch on a whole step
            return [next(batches) for _ in range(self.grad_acc)]
        micro_batches = list(itertools.islice(batches, self.grad_acc))
        return None if self._agreed(len(micro_batches) < self.grad_acc) else micro_batches

    def _end_stream_epoch(self) -> None:
        state = self.state
        if state.step_in_epoch == 0:
            raise UserError(f"dataset: the stream holds fewer than global_batch_size={self.steps.global_batch_size} "
                            f"examples (epoch {state.epoch}); lower global_batch_size or add data")
        logger.info("epoch %d: the stream ran out after %d steps", state.epoch, state.step_in_epoch)
        state.epoch, state.step_in_epoch = state.epoch + 1, 0

    def _advance(self) -> bool:
        """Count a finished step; True when it ended the epoch (the state then points at the next one)."""
        state = self.state
        state.step += 1
        state.step_in_epoch += 1
        if self.steps_per_epoch is not None and state.step_in_epoch == self.steps_per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            return True
        return False

    def _agreed(self, flag) -> bool:
        """True on every rank when any rank saw `flag` (a signal may reach the ranks between different steps)."""
        (count,) = self.parallel.all_reduce_sum(1 if flag else 0)
        return count > 0

    def _stop_for_preemption(self, result: RunResult) -> None:
        step = self.state.step
        if self.ckpt_cfg.enabled and self.last_saved_step != step:
            result.final_dir = self.save(step)
        result.preempted = True
        where = f"{result.final_dir}" if result.final_dir else "nowhere (checkpointing is disabled)"
        logger.info("preempted at step %d: saved to %s; run the same command again to resume", step, where)

    def _after_step(self, record: dict, result: RunResult) -> None:
        step, due = self.state.step, StepSchedulerConfig.due
        self.throughput.add(record)
        if step % self.steps.log_every_steps == 0 or step == self.max_steps:
            elapsed = self.metrics.elapsed()
            done_here = step - self.start_step
            record.update(step=step, elapsed_s=elapsed, eta_s=elapsed / done_here * (self.max_steps - step))
            record.update(self.throughput.window_rates())
            self.metrics.log_train(record, self.max_steps)
        if self.val_loader is not None and due(self.steps.val_every_steps, step, self.max_steps):
            result.val_losses[step] = self.validate(step)
        if self.steps.val_generate_every_steps and due(self.steps.val_generate_every_steps, step, self.max_steps):
            self._generate_on_validation(step)
        if self.ckpt_cfg.enabled and due(self.steps.ckpt_every_steps, step, self.max_steps):
            result.final_dir = self.save(step)
            self.last_saved_step = step

    def _score_the_base_model(self, result: RunResult) -> None:
        """Step 0, before any update: the validation loss and the generation scores the run is compared with."""
        if self.val_loader is not None:
            result.val_losses[0] = self.validate(0)
        self._generate_on_validation(0)

    def _generate_on_validation(self, step: int) -> None:
        if self.val_set is None:
            return
        from automodel.inference.squad_eval import squad_eval_during_training

        with self.precision.autocast(self.device):
            squad_eval_during_training(self.model, self.tokenizer, self.val_set, step, self.metrics)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `grad_acc` micro-batches."""
        start = time.perf_counter()
        self.model.train()
        loss_sum, label_tokens = self.backward(micro_batches)
        grad_norm = clip_grad_norm(self.params, self.clip_grad_norm or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        loss = loss_sum / max(label_tokens, 1)
        if math.isfinite(loss) and math.isfinite(float(grad_norm)):
            self.optimizer.step()
        else:
            self._on_nonfinite(loss, float(grad_norm))
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (tokens,) = self.parallel.all_reduce_sum(sum(count_tokens(b) for b in micro_batches))
        seconds = time.perf_counter() - start
        return {"loss": loss, "grad_norm": float(grad_norm), "lr": lr, "tokens": int(tokens),
                "label_tokens": label_tokens, "tokens_per_s": tokens / seconds, "step_s": seconds,
                **self.forward_loss.router_aux.pop_metrics()}

    def _on_nonfinite(self, loss: float, grad_norm: float) -> None:
        """`skip`: drop this update (the schedule still advances); `stop`: end the run, saving nothing new."""
        step, state = self.state.step + 1, self.state
        per_step = self.grad_acc * self.steps.local_batch_size
        first = state.step_in_epoch * per_step
        where = (f"step {step} (epoch {state.epoch}, samples {first}-{first + per_step - 1} of this rank's "
                 f"seeded epoch order): loss {loss}, grad norm {grad_norm}")
        if self.steps.on_nonfinite == "skip":
            logger.warning("non-finite values at %s: skipping this update", where)
            return
        latest = find_restore_dir(self.ckpt_cfg.checkpoint_dir, "LATEST")
        raise TrainingStopped(f"non-finite values at {where}; stopped without saving (step_scheduler.on_nonfinite"
                              f"=stop). Last checkpoint: {latest or 'none'}")

    def backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """Accumulate gradients of (summed loss / label tokens of the whole step, all ranks): the gradient one batch
        holding all micro-batches of all data-parallel ranks would give. DDP and FSDP2 average gradients over the
        ranks, so each rank's loss is scaled by dp_size. Returns (summed loss, label tokens), both over all ranks."""
        (label_tokens,) = self.parallel.all_reduce_sum(sum(count_label_tokens(b["labels"]) for b in micro_batches))
        scale = self.dp_size / max(label_tokens, 1)
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.parallel.gradient_sync(self.model, enabled=index == len(micro_batches) - 1):
                with self.precision.autocast(self.device):
                    summed, _ = self.forward_loss(batch)
                (summed * scale).backward()
            loss_sum += summed.detach()
        (loss_sum,) = self.parallel.all_reduce_sum(loss_sum.item())
        return loss_sum, int(label_tokens)

    @torch.no_grad()
    def validate(self, step: int) -> float:
        """Token-weighted validation loss over the whole validation set."""
        self.model.eval()
        loss_sum, tokens, seen = 0.0, 0, 0
        real_rows = self.parallel.dp_shard_size(len(self.val_set))
        for batch in progress_bar(len(self.val_loader), "validation", self.log_cfg.progress_bar, leave=False,
                                  iterable=self.val_loader):
            # The sampler pads the last ranks with repeated rows so all run the same batches; they do not count.
            batch, seen = mask_rows_after(batch, real_rows - seen), seen + len(batch["labels"])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.precision.autocast(self.device):
                summed, label_tokens = self.forward_loss(batch)
            loss_sum, tokens = loss_sum + summed.item(), tokens + label_tokens
        loss_sum, tokens = self.parallel.all_reduce_sum(loss_sum, tokens)
        tokens = int(tokens)
        val_loss = loss_sum / max(tokens, 1)
        self.metrics.log_validation(step, val_loss, tokens)
        return val_loss

    def save(self, step: int) -> Path | None:
        """Every rank calls this: training state always (sharded), the HF `model/` folder as
        `checkpoint.save_consolidated` asks. Rank 0 publishes the step folder and gets its path."""
        consolidated = self.ckpt_cfg.save_consolidated == "every" or (
            self.ckpt_cfg.save_consolidated == "final" and step == self.max_steps)
        with host_memory.saving():
            return save_checkpoint(self.parallel, self.model, self.tokenizer, self.cfg_at_rest, self.out_dir, step,
                                   optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, state=self.state,
                                   consolidated=consolidated, keep_last_n=self.ckpt_cfg.keep_last_n,
                                   max_shard_size=self.ckpt_cfg.max_shard_size)

"""Which of automodel's files one training step really crosses, in the order it first enters each.

Runs a real LoRA fine-tune setup on one process (stories260K on SQuAD, the defaults: padding-free batches,
`automodel_sdpa`, the chunked output head, the last layer on label rows; 2 micro-batches a step), then records every
Python function call (`sys.setprofile`) while it runs step 2, a step in the middle of an epoch (step 1 runs
untraced: an epoch's start also asks the dataset its length):

  core step   the recipe's loop body from a batch to an update: `_next_micro_batches` (the loader and its
              collator) and `train_step` (forward, loss, backward, gradient clipping, optimizer and LR scheduler)
  bookkeeping `_advance` and `_after_step` of that step (the step counter, throughput, the log line)
  save        `save(step)`: the step folder (training state) and the Hugging Face `model/` folder (the adapter)

then the core step of the knowledge-distillation recipe on the same setup (`automodel kd llm`, stories260K as its own
teacher), its files marked `(KD only)` where the fine-tuning core step does not cross them.

A file is counted when a function defined in it runs (package `__init__` files only when code in them runs).
Usage: python scripts/step_files.py   (docs/architecture.md shows its output)
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import automodel  # noqa: E402

PACKAGE = Path(automodel.__file__).parent


class FileTrace:
    """The automodel files whose code runs inside the `with` block, in order of first entry."""

    def __init__(self):
        self.files: dict[str, str] = {}

    def _profile(self, frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(PACKAGE):
                self.files.setdefault(str(path.relative_to(PACKAGE.parent)), frame.f_code.co_name)

    def __enter__(self):
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


def step_config(folder: Path) -> dict:
    """One LoRA fine-tune of stories260K on SQuAD: step 2 of 3 logs its line and neither validates nor saves."""
    from tests.helpers import tiny_squad_config

    cfg = tiny_squad_config(folder, peft=True, max_steps=3, train_samples=16)
    cfg["step_scheduler"].update(val_every_steps=None, ckpt_every_steps=1000, log_every_steps=1)
    cfg["checkpoint"]["save_consolidated"] = "every"  # the save writes `model/` too, as the last step's does
    del cfg["validation_dataset"]
    return cfg


def first_step(recipe, batches) -> None:
    """Step 1, untraced: the traced step is one in the middle of an epoch, without the epoch's start (the sampler
    asks the dataset its length once per epoch, in data/dataset.py)."""
    from automodel.training.recipe import RunResult

    record = recipe.train_step(recipe._next_micro_batches(batches))
    recipe._advance()
    recipe._after_step(record, RunResult())


def trace_finetune(folder: Path) -> tuple[FileTrace, FileTrace, FileTrace]:
    """(core step, bookkeeping, save) of the fine-tuning recipe; the save traced on its own."""
    from automodel.training.recipe import FinetuneRecipe, RunResult

    recipe = FinetuneRecipe(step_config(folder))
    recipe.setup()
    batches = recipe._epoch_batches()
    with recipe.parts.metrics:
        first_step(recipe, batches)
        with FileTrace() as core:
            record = recipe.train_step(recipe._next_micro_batches(batches))
        with FileTrace() as bookkeeping:
            recipe._advance()
            recipe._after_step(record, RunResult())
        with FileTrace() as save:
            recipe.save(recipe.state.step)
    recipe.parts.parallel.shutdown()
    return core, bookkeeping, save


def trace_kd(folder: Path) -> FileTrace:
    """The core step of the knowledge-distillation recipe, the student's teacher being the same stories260K."""
    from automodel.training.kd import KDRecipe

    cfg = step_config(folder)
    cfg.update(recipe="llm_kd", kd_ratio=0.5, kd_loss_fn={"temperature": 2.0},
               teacher_model={"pretrained_model_name_or_path": cfg["model"]["pretrained_model_name_or_path"]})
    recipe = KDRecipe(cfg)
    recipe.setup()
    batches = recipe._epoch_batches()
    with recipe.parts.metrics:
        first_step(recipe, batches)
        with FileTrace() as core:
            recipe.train_step(recipe._next_micro_batches(batches))
    recipe.parts.parallel.shutdown()
    return core


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        core, bookkeeping, save = trace_finetune(Path(folder) / "finetune")
        kd = trace_kd(Path(folder) / "kd")
    seen: set[str] = set()
    for name, trace in (("core step", core), ("bookkeeping", bookkeeping), ("save", save)):
        new = [file for file in trace.files if file not in seen]
        print(f"{name}: {len(trace.files)} files ({len(new)} not in the parts above)")
        for file, function in trace.files.items():
            print(f"  {file:44s} first: {function}" + ("" if file in new else "  (again)"))
        seen.update(trace.files)
    kd_only = [file for file in kd.files if file not in core.files]
    print(f"kd core step: {len(kd.files)} files ({len(kd_only)} not in the fine-tuning core step)")
    for file, function in kd.files.items():
        print(f"  {file:44s} first: {function}" + ("  (KD only)" if file in kd_only else ""))


if __name__ == "__main__":
    main()

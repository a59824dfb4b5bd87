"""Which of automodel's files one training step really crosses, in the order it first enters each.

Runs a real LoRA fine-tune setup on one process (stories260K on SQuAD, the defaults: padding-free batches,
`automodel_sdpa`, the chunked output head, the last layer on label rows; 2 micro-batches a step), then records every
Python function call (`sys.setprofile`) while it runs:

  core step   the recipe's loop body from a batch to an update: `_next_micro_batches` (the loader and its
              collator) and `train_step` (forward, loss, backward, gradient clipping, optimizer and LR scheduler)
  bookkeeping `_advance` and `_after_step` of that step (the step counter, throughput, the log line)
  save        `save(step)`: the step folder (training state) and the Hugging Face `model/` folder (the adapter)

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


def main() -> None:
    from automodel.training.recipe import FinetuneRecipe, RunResult
    from tests.helpers import tiny_squad_config

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        cfg = tiny_squad_config(Path(folder), peft=True, max_steps=2, train_samples=16)
        # Step 1 of 2 logs its line and neither validates nor saves; the save is traced on its own.
        cfg["step_scheduler"].update(val_every_steps=None, ckpt_every_steps=1000, log_every_steps=1)
        cfg["checkpoint"]["save_consolidated"] = "every"  # the save writes `model/` too, as the last step's does
        del cfg["validation_dataset"]
        recipe = FinetuneRecipe(cfg)
        recipe.setup()
        batches = recipe._epoch_batches()
        with recipe.parts.metrics:
            with FileTrace() as core:
                record = recipe.train_step(recipe._next_micro_batches(batches))
            with FileTrace() as bookkeeping:
                recipe._advance()
                recipe._after_step(record, RunResult())
            with FileTrace() as save:
                recipe.save(recipe.state.step)
        recipe.parts.parallel.shutdown()
    seen: set[str] = set()
    for name, trace in (("core step", core), ("bookkeeping", bookkeeping), ("save", save)):
        new = [(file, function) for file, function in trace.files.items() if file not in seen]
        print(f"{name}: {len(trace.files)} files ({len(new)} not in the parts above)")
        for file, function in trace.files.items():
            print(f"  {file:44s} first: {function}" + ("" if file in dict(new) else "  (again)"))
        seen.update(trace.files)


if __name__ == "__main__":
    main()

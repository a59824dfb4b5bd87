"""The start banner and the end summary of a run: what is being trained, on what, and what came out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automodel.logging.metrics import format_duration


def _rows(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join([f"── {title} " + "─" * max(4, 60 - len(title)), *lines])


def count_tokens(dataset) -> int:
    """Tokens in all items (prompt + target, no padding)."""
    items = getattr(dataset, "items", None) or (dataset[i] for i in range(len(dataset)))
    return sum(len(item["input_ids"]) for item in items)


def describe_dataset(dataset) -> str:
    if not hasattr(dataset, "__len__"):
        return "streaming (read as training goes; length unknown)"
    text = f"{len(dataset):,} examples"
    counts = [f"{getattr(dataset, attr):,} {word}" for attr, word in (("num_dropped", "dropped"),
                                                                    ("num_truncated", "truncated"))
              if hasattr(dataset, attr)]
    if counts:
        text += f" ({', '.join(counts)} to fit seq_length)"
    return f"{text}, {count_tokens(dataset):,} tokens"


def describe_processes(parallel: Any) -> str:
    """World size and the strategy in effect (`auto` resolved), with the mesh when there are several processes."""
    text = f"world size {parallel.world_size}, strategy {parallel.strategy}"
    if parallel.world_size > 1:
        text += f", data parallel {parallel.dp_size} x tensor parallel {parallel.tp_size}"
    return f"{text}, device {parallel.device.type}"


@dataclass(frozen=True)
class StartFacts:
    """What the start banner says about a run (the recipe fills it in: FinetuneRecipe.start_facts)."""

    command: str                     # "automodel finetune llm"
    model_source: str                # the model section's pretrained_model_name_or_path
    lora: bool
    model: Any                       # parameters counted and their dtype read from it
    train_set: Any
    val_set: Any | None
    batch: str
    steps: str
    parallel: Any                    # distributed/parallel.py's Parallelism
    loss: str                        # the forward's loss path
    output: Path
    extra: tuple[tuple[str, str], ...] = ()  # rows a recipe adds after the model's (the kd recipe's teacher)


def format_start_banner(facts: StartFacts) -> str:
    """What this run trains: model and parameters, data, batch, processes, precision and output folder."""
    from automodel.peft import count_parameters

    total, trainable = count_parameters(facts.model)
    rows = [
        ("model", f"{facts.model_source} ({'LoRA' if facts.lora else 'full SFT'})"),
        *facts.extra,
        ("parameters", f"{total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)"),
        ("train data", describe_dataset(facts.train_set)),
    ]
    if facts.val_set is not None:
        rows.append(("validation", describe_dataset(facts.val_set)))
    rows += [
        ("batch", facts.batch),
        ("steps", facts.steps),
        ("processes", describe_processes(facts.parallel)),
        ("precision", facts.parallel.precision.describe()),
        ("loss", facts.loss),
        ("output", str(facts.output)),
    ]
    return _rows(facts.command, rows)


def next_commands(model_dir: Path, run_dir: Path) -> list[str]:
    step_dir = model_dir.parent
    return [f"automodel generate {step_dir} --prompt 'Once upon a time'",
            f"automodel eval squad {step_dir} --limit 50",
            f"automodel push {model_dir} --repo-id USER/NAME",
            f"automodel plot {run_dir}"]


def format_end_summary(result: Any, elapsed_s: float, rates: dict[str, float], run_dir: Path,
                       plot_path: Path | None) -> str:
    """Steps, time, throughput, best validation loss, where the model is and what to run next."""
    speed = (f"{rates['tokens_per_s']:,.0f} tokens/s, {rates['label_tokens_per_s']:,.0f} label tokens/s, "
             f"peak memory {rates['peak_memory_gb']:.2f} GB")
    if "mfu" in rates:
        speed += f", MFU {100 * rates['mfu']:.3g}%"
    rows = [("steps", f"{result.steps} in {format_duration(elapsed_s)} "
                      f"({format_duration(rates['train_s'])} in training steps)"),
            ("throughput", speed)]
    if result.val_losses:
        best = min(result.val_losses, key=result.val_losses.get)
        rows.append(("validation", f"best loss {result.val_losses[best]:.4f} at step {best}"))
    model_dir = result.final_dir / "model" if result.final_dir else None
    if model_dir is None:
        rows.append(("final model", "(checkpointing disabled)"))
    elif not model_dir.is_dir():
        rows.append(("final model", f"{result.final_dir} (write model/ with: automodel export {result.final_dir})"))
        model_dir = None
    else:
        rows.append(("final model", str(model_dir)))
    if plot_path is not None:
        rows.append(("plot", str(plot_path)))
    if model_dir is not None:
        commands = next_commands(model_dir, run_dir)
        rows += [("next", commands[0]), *(("", c) for c in commands[1:])]
    return _rows("done", rows)

"""The start banner and the end summary of a run: what is being trained, on what, and what came out."""

from __future__ import annotations

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


def format_start_banner(recipe: Any, steps_reason: str) -> str:
    """What this run trains: model and parameters, data, batch, processes, precision and output folder."""
    from automodel.peft import count_parameters

    total, trainable = count_parameters(recipe.model)
    model_cfg = recipe.cfg.get("model") or {}
    steps = recipe.steps
    rows = [
        ("model", f"{model_cfg.get('pretrained_model_name_or_path', '?')} "
                  f"({'LoRA' if recipe.peft_cfg else 'full SFT'})"),
        ("parameters", f"{total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)"),
        ("train data", describe_dataset(recipe.train_set)),
    ]
    if recipe.val_set is not None:
        rows.append(("validation", describe_dataset(recipe.val_set)))
    rows += [
        ("batch", f"{steps.global_batch_size} per step = {steps.local_batch_size} per micro-batch x "
                  f"{recipe.grad_acc} accumulation x {recipe.dp_size} data-parallel"),
        ("steps", f"{recipe.max_steps}: {steps_reason}"),
        ("processes", describe_processes(recipe.parallel)),
        ("precision", recipe.precision.describe()),
        ("loss", recipe.forward_loss.describe()),
        ("output", str(recipe.out_dir)),
    ]
    return _rows("automodel finetune llm", rows)


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

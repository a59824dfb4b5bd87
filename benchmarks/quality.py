"""SmolLM2-135M-Instruct on SQuAD v1.1: does fine-tuning learn the task? One table: base, LoRA, full SFT.

The LoRA row is the README's main job (examples/llm_finetune/smollm2_135m_squad_peft.yaml), run through the CLI;
the full-SFT row is the same job without its `peft` section and with a full-SFT learning rate. Each run scores the
same N questions of SQuAD v1.1 dev part a (other articles than the training questions), taken from all 24 of its
articles in turn (the example's `validation_dataset.spread_over_articles`; the file's first 200 all come from one
article), by greedy generation: exact match and F1, and the validation loss over the same questions. The base row
is the LoRA run's step 0 (a fresh adapter changes nothing). Wall time is the whole command: model load,
tokenizing, scoring before and after, training.

A second table measures where prompt and answer are split (automodel/data/boundary.py), on the default template
`Context: ... Question: ... Answer: `, whose trailing space is the case the split is about: the mean loss over the
answer tokens (answer + EOS) of held-out dev rows, with prompt and answer tokenized separately (the split automodel
used before) and with the joined text split where the tokenizer splits it (the split it uses now), before any update
and after the same LoRA steps on training rows tokenized the same way. That comparison trains in a plain PyTorch
loop here (identical for both splits), since the library no longer builds the separate split.

    python benchmarks/quality.py                                    # the tables (CPU: tens of minutes)
    python benchmarks/quality.py --questions 4 --steps 1 --boundary-rows 4 --boundary-steps 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", REPO.parent / "shared" / "assets")).resolve()
EXAMPLE = "examples/llm_finetune/smollm2_135m_squad_peft.yaml"
SMOL = ASSETS / "models" / "SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SQUAD_TRAIN = ASSETS / "squad_v1.1" / "train-v1.1.subset.json"
SQUAD_DEV = ASSETS / "squad_v1.1" / "dev-v1.1.part_a.json"
SFT_LR = "5.0e-5"  # full SFT moves every weight: a learning rate 40x below LoRA's
BOUNDARY_TEMPLATE = "Context: {context} Question: {question} Answer: "  # automodel's default SQuAD template


# ---- base, LoRA, full SFT ---------------------------------------------------------------------------

def run_commands(questions: int | None, steps: int | None, workdir: Path) -> dict[str, list[str]]:
    """The CLI command of each fine-tune, as a user would type it (from the repository root)."""
    common = ["--logging.progress_bar=false"]
    if questions is not None:
        common.append(f"--validation_dataset.limit_dataset_samples={questions}")
    if steps is not None:
        common += [f"--step_scheduler.max_steps={steps}", f"--step_scheduler.val_generate_every_steps={steps}"]
    return {
        # The example leaves the base model's scoring out to save time; here it is the table's first row.
        "LoRA": ["automodel", "finetune", "llm", "-c", EXAMPLE, *common, "--step_scheduler.val_generate_at_start=true",
                 f"--checkpoint.checkpoint_dir={workdir / 'lora'}"],
        "full SFT": ["automodel", "finetune", "llm", "-c", EXAMPLE, *common, "--peft=null",
                     f"--optimizer.lr={SFT_LR}", "--lr_scheduler.min_lr=5.0e-6",
                     "--step_scheduler.val_generate_at_start=false", "--checkpoint.enabled=false",
                     f"--checkpoint.checkpoint_dir={workdir / 'sft'}"],
    }


def start_finetune(command: list[str], log: Path) -> subprocess.Popen:
    """Start one fine-tune as a user would run it, its output going to `log`."""
    env = dict(os.environ, AUTOMODEL_ASSETS=str(ASSETS),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "automodel", *command[1:]], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_for_one(running: dict[int, tuple[str, float, Path]]) -> tuple[str, float, float]:
    """Wait for whichever fine-tune ends first; (its name, wall seconds, CPU seconds). On a shared machine the
    CPU seconds are the steadier measure: the wall time also holds the waits for other processes."""
    pid, status, usage = os.wait4(-1, 0)
    name, start, log = running.pop(pid)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"the {name} fine-tune failed (exit {code}); its output: {log}\n" + log.read_text()[-3000:])
    return name, time.monotonic() - start, usage.ru_utime + usage.ru_stime


def metrics_records(command: list[str]) -> list[dict]:
    checkpoint_dir = Path(next(a for a in command if a.startswith("--checkpoint.checkpoint_dir=")).split("=", 1)[1])
    return [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines()]


def at_step(records: list[dict], kind: str, step: int) -> dict:
    return next(r for r in records if r["kind"] == kind and r["step"] == step)


def quality_rows(questions: int | None, steps: int | None, workdir: Path, parallel: bool) -> list[dict]:
    """The fine-tunes one after the other, or with `parallel` at the same time (each then waits for the other
    too: compare their CPU times)."""
    commands = run_commands(questions, steps, workdir)
    logs = {name: workdir / f"{name.replace(' ', '-')}.log" for name in commands}
    timings, running = {}, {}
    for name, command in commands.items():
        running[start_finetune(command, logs[name]).pid] = (name, time.monotonic(), logs[name])
        while running and not parallel:
            name, *timing = wait_for_one(running)
            timings[name] = tuple(timing)
    while running:
        name, *timing = wait_for_one(running)
        timings[name] = tuple(timing)
    rows = []
    for name, command in commands.items():
        (seconds, cpu_seconds), records, log = timings[name], metrics_records(command), logs[name]
        last = max(r["step"] for r in records if r["kind"] == "train")
        if name == "LoRA":  # step 0 of the LoRA run is the base model
            rows.append(row("base (no training)", records, 0, 0, None, None, "(step 0 of the LoRA run)"))
        rows.append(row(name, records, last, last, seconds, cpu_seconds, shlex.join(command)))
        print(f"  {name}: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU; output in {log}", flush=True)
    return rows


def row(name: str, records: list[dict], step: int, steps: int, seconds: float | None, cpu_seconds: float | None,
        command: str) -> dict:
    scores = at_step(records, "generation", step)
    return {"run": name, "exact_match": scores["exact_match"], "f1": scores["f1"], "total": scores["total"],
            "unstopped": scores["ran_to_max_new_tokens"], "val_loss": at_step(records, "validation", step)["val_loss"],
            "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds, "command": command}


def minutes(seconds: float | None) -> str:
    return f"{seconds / 60:.1f} min" if seconds is not None else "-"


def quality_table(rows: list[dict]) -> str:
    lines = ["| run | exact match | F1 | answers without EOS | validation loss | steps | wall time | CPU time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['exact_match']:.1f} | {r['f1']:.1f} | {r['unstopped']}/{r['total']} | "
                     f"{r['val_loss']:.4f} | {r['steps']} | {minutes(r['seconds'])} | {minutes(r['cpu_seconds'])} |")
    lines += ["", "commands (from the repository root):"] + [f"  {r['run']}: {r['command']}" for r in rows]
    return "\n".join(lines)


# ---- token boundaries -------------------------------------------------------------------------------

def boundary_items(tokenizer, path: Path, split: str, rows: int) -> dict[str, list[dict]]:
    """The same SQuAD rows under both splits: `joined` from the library's SQuAD builder, `separate` as the library
    built them before (prompt and answer tokenized apart, BOS in front, EOS behind)."""
    from automodel.data.squad import make_squad_dataset, render
    from automodel.data.tokenizer import special_token_affixes

    dataset = make_squad_dataset(tokenizer, dataset_name=str(path), split=split, seq_length=512,
                                 limit_dataset_samples=rows, prompt_template=BOUNDARY_TEMPLATE, cache=False)
    prefix, eos = special_token_affixes(tokenizer)[0], tokenizer.eos_token_id
    joined, separate = [], []
    for index, example in enumerate(dataset.examples):
        item = dataset[index]
        joined.append({"input_ids": list(item["input_ids"]), "labels": list(item["labels"])})
        prompt = prefix + tokenizer(render(BOUNDARY_TEMPLATE, example["context"], example["question"]),
                                    add_special_tokens=False)["input_ids"]
        answer = tokenizer(example["target"], add_special_tokens=False)["input_ids"] + [eos]
        separate.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return {"separate": separate, "joined": joined}


def answer_loss(model, item: dict):
    """Summed cross-entropy over the answer tokens of one row, and their count (logits only at those positions)."""
    import torch

    ids, labels = torch.tensor([item["input_ids"]]), torch.tensor(item["labels"])
    answer_len = int((labels != -100).sum())
    logits = model(input_ids=ids, logits_to_keep=answer_len + 1).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, labels[-answer_len:], reduction="sum"), answer_len


def mean_answer_loss(model, items: list[dict]) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            loss, n = answer_loss(model, item)
            total, count = total + float(loss), count + n
    return total / count


def lora_steps(model, items: list[dict], steps: int, batch: int) -> None:
    """`steps` AdamW steps of the main job's LoRA settings, each over `batch` rows (token-weighted mean loss)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        rows = items[step * batch:(step + 1) * batch]
        tokens = sum(sum(label != -100 for label in row["labels"]) for row in rows)
        for row in rows:
            loss, _ = answer_loss(model, row)
            (loss / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def boundary_rows(train_rows: int, dev_rows: int, steps: int) -> list[dict]:
    import torch
    from peft import LoraConfig, get_peft_model

    from automodel.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(SMOL), gguf_file=SMOL_FILE)
    train = boundary_items(tokenizer, SQUAD_TRAIN, "train", train_rows)
    dev = boundary_items(tokenizer, SQUAD_DEV, "validation", dev_rows)
    results = []
    for split in ("separate", "joined"):
        torch.manual_seed(1234)
        model = load_causal_lm(str(SMOL), gguf_file=SMOL_FILE, dtype="float32")
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
        before = mean_answer_loss(model, dev[split])
        start = time.monotonic()
        lora_steps(model, train[split], steps, len(train[split]) // steps)
        seconds = time.monotonic() - start
        after = mean_answer_loss(model, dev[split])
        first = tokenizer.convert_ids_to_tokens(dev[split][0]["input_ids"])
        boundary = len(first) - sum(label != -100 for label in dev[split][0]["labels"])
        results.append({"split": split, "before": before, "after": after, "seconds": seconds,
                        "answer_tokens": sum(sum(l != -100 for l in r["labels"]) for r in dev[split]),
                        "example": first[boundary - 3:boundary] + ["|"] + first[boundary:boundary + 3]})
        print(f"  boundary {split}: {before:.3f} -> {after:.3f}", flush=True)
    return results


def boundary_table(results: list[dict], train_rows: int, dev_rows: int, steps: int) -> str:
    names = {"separate": "prompt and answer tokenized apart (before)",
             "joined": "joined text split where the tokenizer splits it (now)"}
    lines = [f"| split | first dev row at the boundary | answer tokens ({dev_rows} dev rows) | answer-token loss "
             f"before training | after {steps} LoRA steps ({train_rows} train rows) |", "|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {names[r['split']]} | `{' '.join(r['example'])}` | {r['answer_tokens']} | "
                     f"{r['before']:.3f} | {r['after']:.3f} |")
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------

def machine_line() -> str:
    import torch
    import transformers

    load = os.getloadavg()
    return (f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}; load average at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, help="N questions of SQuAD v1.1 dev part a, spread over its "
                        "articles (default: the example config's)")
    parser.add_argument("--steps", type=int, help="training steps (default: the example config's)")
    parser.add_argument("--boundary-rows", type=int, default=32, help="train rows and dev rows of the boundary table")
    parser.add_argument("--boundary-steps", type=int, default=8)
    parser.add_argument("--parallel", action="store_true", help="run the two fine-tunes at the same time")
    parser.add_argument("--skip", choices=["quality", "boundary"], help="leave one table out")
    parser.add_argument("--workdir", help="keep the runs' checkpoints and output here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)
    results = {}
    if args.skip != "quality":
        with tempfile.TemporaryDirectory(prefix="automodel-quality-") as tmp:
            workdir = Path(args.workdir or tmp).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
            results["quality"] = quality_rows(args.questions, args.steps, workdir, args.parallel)
        print(f"\nSmolLM2-135M-Instruct on {results['quality'][0]['total']} questions of SQuAD v1.1 dev part a "
              "(held out) from all its articles in turn, greedy answers of at most 32 tokens:\n", flush=True)
        print(quality_table(results["quality"]), flush=True)
    if args.skip != "boundary":
        start = time.monotonic()
        results["boundary"] = boundary_rows(args.boundary_rows, args.boundary_rows, args.boundary_steps)
        print(f"\nWhere prompt and answer are split (template {BOUNDARY_TEMPLATE!r}, same weights, same rows; "
              f"{(time.monotonic() - start) / 60:.1f} min):\n", flush=True)
        print(boundary_table(results["boundary"], args.boundary_rows, args.boundary_rows, args.boundary_steps))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Evaluate a model on SQuAD by generation, with the exact prompt the training run used.

The questions go through the same builder as training (`make_squad_dataset`), with the run's
`prompt_template`, `seq_length` and `unanswerable_target` read from the checkpoint's config.yaml, so a
prompt here is byte for byte the string the run validated on. A context too long for `seq_length` keeps its
start (`truncation: context_start`), as the run's validation set did: the gold answer never decides what a
question shows, and the questions whose every answer was cut away are counted in the report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from automodel.data.squad import (CONTEXT_START, DEFAULT_PROMPT_TEMPLATE, SQUAD_BUILDER, count_answer_cut,
                                  make_squad_dataset)
from automodel.errors import UserError
from automodel.inference.generate import GenerationSettings, Generator
from automodel.inference.squad_metrics import normalize_answer, squad_scores

logger = logging.getLogger("automodel")

PREDICTIONS_FILE = "predictions.json"
SCORES_FILE = "scores.json"


@dataclass
class SquadEvalOptions:
    """Which questions and how they are prompted; None means "as the training run did" (or the default)."""

    dataset: str | None = None
    split: str = "validation"
    limit: int | None = None
    seq_length: int | None = None
    prompt_template: str | None = None
    unanswerable_target: str | None = None
    version: str | None = None
    spread_over_articles: bool | None = None


def run_squad_settings(train_config: dict | None) -> dict[str, Any]:
    """The SQuAD builder arguments of a training run: its validation set's, else its training set's."""
    for section in ("validation_dataset", "dataset"):
        node = (train_config or {}).get(section) or {}
        if node.get("_target_") == SQUAD_BUILDER:
            return {k: v for k, v in node.items() if k != "_target_"}
    return {}


def resolve_options(options: SquadEvalOptions, train_config: dict | None, max_positions: int | None,
                    max_new_tokens: int) -> dict[str, Any]:
    """make_squad_dataset's arguments: the command's options, then the run's, then defaults."""
    run = run_squad_settings(train_config)
    dataset = options.dataset or run.get("dataset_name")
    if dataset is None:
        raise UserError("--dataset: no SQuAD file or hub id given, and the model is not a checkpoint of a SQuAD run")
    seq_length = options.seq_length or run.get("seq_length")
    # The run's own validation questions, as many as it validated on, unless another set is named.
    limit = options.limit or (None if options.dataset else run.get("limit_dataset_samples"))
    spread = options.spread_over_articles
    if spread is None:
        spread = False if options.dataset else run.get("spread_over_articles", False)
    if seq_length is None and max_positions:
        seq_length = max_positions - max_new_tokens  # prompt + answer must leave room inside the model's context
    return {"dataset_name": dataset, "split": options.split if options.dataset else run.get("split", options.split),
            "seq_length": seq_length, "limit_dataset_samples": limit,
            "prompt_template": options.prompt_template or run.get("prompt_template", DEFAULT_PROMPT_TEMPLATE),
            "unanswerable_target": options.unanswerable_target or run.get("unanswerable_target", "unanswerable"),
            "truncation": CONTEXT_START, "spread_over_articles": spread}


def load_questions(tokenizer, builder_args: dict[str, Any]) -> list[dict[str, Any]]:
    """The questions as the training builder sees them: `id, question, context, answers, prompt`."""
    dataset = make_squad_dataset(tokenizer, **builder_args)
    if dataset.num_dropped:
        logger.info("%d questions do not fit seq_length=%s and are not evaluated", dataset.num_dropped,
                    builder_args["seq_length"])
    return dataset.examples


def predict(generator: Generator, questions: list[dict[str, Any]], settings: GenerationSettings,
            unanswerable_target: str, version: str) -> tuple[dict[str, str], int]:
    """id -> predicted answer, and how many answers ran to max_new_tokens without an EOS; in v2.0 the trained
    "unanswerable" text becomes the official empty answer."""
    completions = generator.complete([q["prompt"] for q in questions], settings)
    no_answer = normalize_answer(unanswerable_target)
    predictions = {}
    for question, (text, _) in zip(questions, completions):
        answer = text.splitlines()[0].strip() if text else ""
        predictions[question["id"]] = "" if version == "2.0" and normalize_answer(answer) == no_answer else answer
    return predictions, sum(not stopped for _, stopped in completions)


def evaluate_squad(generator: Generator, options: SquadEvalOptions, settings: GenerationSettings,
                   output_dir: str | Path | None = None) -> dict[str, Any]:
    """Generate answers, score them, and write predictions.json and scores.json to `output_dir` (if given)."""
    train_config = generator.source.train_config if generator.source else None
    max_positions = getattr(generator.model.config, "max_position_embeddings", None)
    builder_args = resolve_options(options, train_config, max_positions, settings.max_new_tokens)
    questions = load_questions(generator.tokenizer, builder_args)
    version = options.version or ("2.0" if any(not q["answers"] for q in questions) else "1.1")
    logger.info("SQuAD v%s: generating answers for %d questions", version, len(questions))
    predictions, unstopped = predict(generator, questions, settings, builder_args["unanswerable_target"], version)
    scores = squad_scores(predictions, {q["id"]: q["answers"] for q in questions}, version)
    report = {"version": version, **scores, "ran_to_max_new_tokens": unstopped,
              "answer_cut_away": count_answer_cut(questions),
              "model": generator.source.describe() if generator.source else None,
              "dataset": str(builder_args["dataset_name"]), "split": builder_args["split"],
              "prompt_template": builder_args["prompt_template"], "seq_length": builder_args["seq_length"],
              "generation": asdict(settings)}
    if output_dir is not None:
        write_results(Path(output_dir), predictions, report)
    return report


def write_results(output_dir: Path, predictions: dict[str, str], report: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / PREDICTIONS_FILE).write_text(json.dumps(predictions, indent=1, ensure_ascii=False) + "\n")
    (output_dir / SCORES_FILE).write_text(json.dumps(report, indent=1) + "\n")


def format_summary(report: dict[str, Any]) -> str:
    line = (f"SQuAD v{report['version']} | {report['total']} questions | exact match {report['exact_match']:.2f} | "
            f"F1 {report['f1']:.2f} | {report['ran_to_max_new_tokens']} ran to max_new_tokens "
            f"({report['generation']['max_new_tokens']}) without EOS | {report['answer_cut_away']} with every "
            f"answer cut out of the context (seq_length {report['seq_length']})")
    if report["version"] == "2.0":
        line += (f" | HasAns EM {report['HasAns_exact_match']:.2f} F1 {report['HasAns_f1']:.2f} "
                 f"({report['HasAns_total']}) | NoAns EM {report['NoAns_exact_match']:.2f} ({report['NoAns_total']})")
    return line


def squad_eval_during_training(model, tokenizer, dataset, step: int, metrics,
                               settings: GenerationSettings | None = None) -> dict[str, Any]:
    """The in-training hook (`step_scheduler.val_generate_every_steps`): answer the validation questions by
    greedy generation, score them, and log a `kind: generation` record to the console and metrics.jsonl."""
    questions = dataset.examples
    if not questions or "answers" not in questions[0]:
        raise UserError("step_scheduler.val_generate_every_steps: the validation set has no SQuAD questions with "
                        "answers; use automodel.data.squad.make_squad_dataset for validation_dataset")
    no_answer_target = next((q["target"] for q in questions if not q["answers"]), "unanswerable")
    version = "2.0" if any(not q["answers"] for q in questions) else "1.1"
    padding_side = tokenizer.padding_side  # the generator pads on the left; training batches are padded by hand
    model.eval()
    try:
        predictions, unstopped = predict(Generator(model, tokenizer), questions,
                                         settings or GenerationSettings(max_new_tokens=32), no_answer_target, version)
    finally:
        tokenizer.padding_side = padding_side
    scores = squad_scores(predictions, {q["id"]: q["answers"] for q in questions}, version)
    cut_away = count_answer_cut(questions)
    metrics.write({"kind": "generation", "step": step, "exact_match": scores["exact_match"], "f1": scores["f1"],
                   "total": scores["total"], "ran_to_max_new_tokens": unstopped, "answer_cut_away": cut_away})
    metrics.echo(f"step {step} | SQuAD by generation: exact match {scores['exact_match']:.2f} | "
                 f"F1 {scores['f1']:.2f} over {scores['total']} questions ({unstopped} without EOS, "
                 f"{cut_away} with every answer cut out of the context)")
    return scores

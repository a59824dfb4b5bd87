"""`automodel eval squad`: exact match and F1 by generation, with the training run's prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from automodel.cli.common import add_logging_arguments, add_model_arguments, new_parser, start
from automodel.errors import UserError

BENCHMARKS = ("squad",)
EXAMPLES = """examples:
  automodel eval squad checkpoints/stories260K_squad_peft --limit 50
  automodel eval squad MODEL --dataset dev-v2.0.json --version 2.0 --output-dir eval/
"""


def build_parser():
    parser = new_parser("automodel eval squad", "Answer SQuAD questions by greedy generation and score them with the "
                        "official SQuAD normalisation (exact match, F1; v2.0: no-answer handling). A checkpoint's "
                        "own prompt_template, seq_length and validation set are used unless given here.", EXAMPLES)
    add_model_arguments(parser)
    parser.add_argument("--dataset", help="SQuAD file, folder or hub id (default: the run's validation set)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, help="only the first N questions (default: the run's validation limit)")
    parser.add_argument("--spread-over-articles", action=argparse.BooleanOptionalAction,
                        help="take the N questions from every article in turn, not the file's first N (default: "
                             "as the run's validation set did)")
    parser.add_argument("--seq-length", type=int, help="prompt + answer token budget (default: the run's)")
    parser.add_argument("--prompt-template", help="default: the run's, else 'Context: {context} Question: "
                                                  "{question} Answer: '")
    parser.add_argument("--unanswerable-target", help="the text the model was trained to say for no answer "
                                                      "(default: the run's, else 'unanswerable')")
    parser.add_argument("--version", choices=["1.1", "2.0"], help="default: 2.0 when some question has no answer")
    parser.add_argument("--output-dir", help="where predictions.json and scores.json go "
                                             "(default: <step folder>/squad_eval, else ./squad_eval)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        raise UserError(f"automodel eval: unknown benchmark '{argv[0]}'; known: {', '.join(BENCHMARKS)}")
    args = build_parser().parse_args(argv[1:])
    start(args)
    from automodel.inference.generate import GenerationSettings, Generator
    from automodel.inference.squad_eval import SquadEvalOptions, evaluate_squad, format_summary

    generator = Generator.load(args.model, args.adapter, args.dtype, args.trust_remote_code, args.device)
    options = SquadEvalOptions(dataset=args.dataset, split=args.split, limit=args.limit, seq_length=args.seq_length,
                               prompt_template=args.prompt_template, unanswerable_target=args.unanswerable_target,
                               version=args.version, spread_over_articles=args.spread_over_articles)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(generator.source)
    report = evaluate_squad(generator, options, settings, output_dir)
    print(format_summary(report))
    print(f"predictions: {output_dir / 'predictions.json'}\nscores: {output_dir / 'scores.json'}")
    return 0


def default_output_dir(source) -> Path:
    return (source.step_dir if source.step_dir is not None else Path(".")) / "squad_eval"

"""`automodel generate`: completions for one prompt (streamed), a prompts file, or SQuAD questions."""

from __future__ import annotations

import json
import sys

from automodel.cli.common import add_logging_arguments, add_model_arguments, new_parser, start

EXAMPLES = """examples:
  automodel generate checkpoints/stories260K_squad_peft --prompt "Once upon a time"
  automodel generate MODEL --prompts-file prompts.txt --output completions.jsonl
  automodel generate MODEL --prompts-file rows.jsonl --template "Q: {question} A:"
  automodel generate CHECKPOINT --squad dev-v1.1.json --limit 5     (the run's SQuAD prompt)
"""


def build_parser():
    parser = new_parser("automodel generate", "Generate text with a model, a fine-tune or base + LoRA adapter. "
                        "Greedy unless --temperature > 0; stops at EOS.", EXAMPLES)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; the completion streams to the terminal")
    source.add_argument("--prompts-file", help="one prompt per line, or JSONL rows ({'prompt': ...} or fields "
                                               "for --template)")
    source.add_argument("--squad", metavar="DATASET", help="SQuAD file/folder/hub id: prompts from the training "
                                                           "run's template (or --template)")
    parser.add_argument("--template", help="prompt template with {field} placeholders (SQuAD: {context}, {question})")
    parser.add_argument("--split", default="validation", help="SQuAD split (default validation)")
    parser.add_argument("--limit", type=int, help="only the first N SQuAD questions")
    parser.add_argument("--output", help="write JSONL records with a 'completion' field here (default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    start(args)
    from automodel.inference.generate import GenerationSettings, Generator, read_prompts

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, batch_size=args.batch_size, seed=args.seed)
    generator = Generator.load(args.model, args.adapter, args.dtype, args.trust_remote_code, args.device)
    if args.prompt is not None:
        generator.stream(args.prompt, settings)
        return 0
    records = read_prompts(args.prompts_file, args.template) if args.prompts_file else \
        squad_records(generator, args, settings)
    completions = generator.generate([r["prompt"] for r in records], settings)
    # The completion next to the input's fields, the (long) prompt last so the lines read well.
    write_records([{**{k: v for k, v in r.items() if k != "prompt"}, "completion": c, "prompt": r["prompt"]}
                   for r, c in zip(records, completions)], args.output)
    return 0


def squad_records(generator, args, settings) -> list[dict]:
    from automodel.inference.squad_eval import SquadEvalOptions, load_questions, resolve_options

    options = SquadEvalOptions(dataset=args.squad, split=args.split, limit=args.limit, prompt_template=args.template)
    train_config = generator.source.train_config
    max_positions = getattr(generator.model.config, "max_position_embeddings", None)
    questions = load_questions(generator.tokenizer,
                               resolve_options(options, train_config, max_positions, settings.max_new_tokens))
    return [{"id": q["id"], "question": q["question"], "answers": q["answers"], "prompt": q["prompt"]}
            for q in questions]


def write_records(records: list[dict], output: str | None) -> None:
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if output is None:
        sys.stdout.write(lines)
        return
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(lines)
    print(f"wrote {len(records)} completions to {output}")

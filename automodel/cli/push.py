"""`automodel push`: upload a model, adapter or checkpoint to the Hugging Face Hub with a model card."""

from __future__ import annotations

import json
from pathlib import Path

from automodel.cli.common import add_logging_arguments, new_parser, start
from automodel.errors import UserError

EXAMPLES = """examples:
  automodel push checkpoints/stories260K_squad_peft --repo-id you/stories260K-squad-lora --private
  automodel push merged/ --repo-id you/model --revision v1 --dry-run

The token comes from HF_TOKEN or `hf auth login`; it is never printed.
"""


def build_parser():
    parser = new_parser("automodel push", "Upload a model or adapter folder (or a checkpoint's) to the Hub in one "
                        "commit, creating the repo if missing, with a README.md model card written from the run "
                        "(base model, datasets, training config, final metrics, SQuAD scores).", EXAMPLES)
    parser.add_argument("model", help="checkpoint_dir (its LATEST step), step folder, model or adapter folder")
    parser.add_argument("--repo-id", required=True, help="user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--scores", help="a scores.json from `automodel eval squad` for the card "
                                         "(default: the checkpoint's squad_eval/scores.json when present)")
    parser.add_argument("--message", default="Upload model trained with automodel", help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="print the files and the model card, upload nothing")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    start(args)
    from automodel.inference.hub import plan_push, push
    from automodel.inference.sources import resolve_source

    source = resolve_source(args.model)
    plan = plan_push(source, args.repo_id, read_scores(args.scores, source.step_dir))
    if args.dry_run:
        print(f"would upload to {args.repo_id}: {', '.join(plan.files)} + README.md from {plan.folder}")
        print(plan.card, end="")
        return 0
    url = push(plan, args.repo_id, private=args.private, revision=args.revision, commit_message=args.message)
    print(f"pushed {len(plan.files)} files + README.md to {args.repo_id}: {url}")
    return 0


def read_scores(path: str | None, step_dir: Path | None) -> dict | None:
    if path is None and step_dir is not None and (step_dir / "squad_eval" / "scores.json").is_file():
        path = str(step_dir / "squad_eval" / "scores.json")
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--scores: cannot read {path}: {err}") from None

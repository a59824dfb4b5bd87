"""`automodel serve`: prepare a folder vLLM loads and print (or run) the `vllm serve` command."""

from __future__ import annotations

import os

from automodel.cli.common import add_logging_arguments, new_parser, start
from automodel.errors import UserError
from automodel.paths import check_plain_name

EXAMPLES = """examples:
  automodel serve checkpoints/stories260K_squad_peft --output serve/ --name squad-lora
  automodel serve checkpoints/stories260K_squad_peft --output serve/ --merge      (merged weights)
  automodel serve checkpoints/stories260K_squad_sft --output serve/ --run          (exec vllm serve)
"""


def build_parser():
    parser = new_parser("automodel serve", "Prepare a model for vLLM: a LoRA adapter checked against vLLM's LoRA "
                        "limits (served with --enable-lora --lora-modules), or merged/full weights; then print the "
                        "exact `vllm serve` command, or run it with --run.", EXAMPLES)
    parser.add_argument("model", help="checkpoint_dir (its LATEST step), step folder, model or adapter folder, or "
                                      "hub id")
    parser.add_argument("--adapter", help="a LoRA adapter folder to serve on MODEL")
    parser.add_argument("-o", "--output", required=True, help="folder to prepare")
    parser.add_argument("--name", default="automodel", help="the served model / LoRA name (default automodel)")
    parser.add_argument("--merge", action="store_true", help="serve merged weights instead of base + adapter")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    parser.add_argument("--run", action="store_true", help="exec `vllm serve` after preparing (needs vLLM)")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_plain_name(args.name, "--name")  # it becomes a folder under --output
    start(args)
    from automodel.inference.sources import resolve_source
    from automodel.inference.vllm import INSTALL_HINT, prepare_for_vllm, vllm_installed

    plan = prepare_for_vllm(resolve_source(args.model, args.adapter), args.output, args.name, merge=args.merge,
                            port=args.port, overwrite=args.overwrite)
    print(f"prepared {plan.folder}\nserve it with:\n  {plan.shell_command()}")
    installed = vllm_installed()
    if args.run:
        if not installed:
            raise UserError(INSTALL_HINT)
        os.execvp(plan.command[0], plan.command)
    if not installed:
        print(f"note: {INSTALL_HINT}")
    return 0

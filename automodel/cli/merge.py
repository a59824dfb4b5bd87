"""`automodel merge-lora`: base + LoRA adapter -> one Hugging Face model folder."""

from __future__ import annotations

from automodel.cli.common import add_logging_arguments, add_model_arguments, new_parser, start

EXAMPLES = """examples:
  automodel merge-lora checkpoints/stories260K_squad_peft --output merged/
  automodel merge-lora BASE_MODEL --adapter ADAPTER_FOLDER --output merged/ --dtype bfloat16
"""


def build_parser():
    parser = new_parser("automodel merge-lora", "Fold a LoRA adapter into its base model and save the result as "
                        "a plain transformers folder (safetensors, config, tokenizer). dtype: the base model's "
                        "stored dtype unless --dtype says otherwise.", EXAMPLES)
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="the new model folder")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    start(args)
    from automodel.inference.merge import merge_lora
    from automodel.inference.sources import resolve_source

    source = resolve_source(args.model, args.adapter)
    folder = merge_lora(source, args.output, args.dtype, args.trust_remote_code, args.overwrite)
    print(f"merged model written to {folder}")
    return 0

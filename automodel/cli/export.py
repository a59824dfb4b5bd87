"""`automodel export STEP_DIR [--output DIR]`: write the HF-loadable model folder of any checkpoint step.
`automodel export MODEL --format gguf --type Q8_0 --output FILE.gguf`: one GGUF file for llama.cpp and Ollama."""

from __future__ import annotations

from automodel.cli.common import new_parser

EXAMPLES = """examples:
  automodel export checkpoints/run/step_200
  automodel export checkpoints/run --format gguf --type Q8_0 --output run-q8_0.gguf
  automodel export checkpoints/run --format gguf --type Q4_K_M --output run-q4_k_m.gguf   (needs llama.cpp)
"""


def main(argv: list[str]) -> int:
    parser = new_parser(
        "automodel export",
        "Turn a checkpoint step folder (its dcp/ training state) into a Hugging Face model folder: full weights "
        "for SFT, the PEFT adapter for LoRA. Works offline, in one process, whatever the number of processes that "
        "trained. With --format gguf: write any model (checkpoint_dir, step folder, model or LoRA adapter folder; an "
        "adapter is merged into its base first) as one .gguf file with its tokenizer and chat template.", EXAMPLES)
    parser.add_argument("step_dir", metavar="MODEL",
                        help="a <checkpoint_dir>/step_<N> folder; with --format gguf any model the other commands take")
    parser.add_argument("--output", help="where to write (default: STEP_DIR/model; --format gguf: the .gguf file)")
    parser.add_argument("--format", choices=["hf", "gguf"], default="hf",
                        help="hf: a Hugging Face folder from a step's training state (default); gguf: one GGUF file")
    parser.add_argument("--type", default="F16",
                        help="GGUF tensor type: F32, F16 (default), BF16, Q8_0; Q4_K_M and the other llama.cpp "
                             "quants with llama.cpp's quantizer")
    parser.add_argument("--adapter", help="--format gguf: a LoRA adapter folder (or checkpoint) to merge into MODEL")
    parser.add_argument("--quantizer", metavar="PATH",
                        help="llama.cpp's llama-quantize, or a Python with llama-cpp-python, for the k-quants")
    parser.add_argument("--trust-pickled-state", action="store_true",
                        help="read a step folder your runs did not write: its dcp/ state is unpickled, which can run "
                             "code (docs/security.md)")
    parser.add_argument("--allow-target", action="append", default=[], metavar="PREFIX",
                        help="let the step's config `_target_`s come from PREFIX too (docs/security.md)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repo's own code (off); hf: the step's config sets model.trust_remote_code")
    args = parser.parse_args(argv)
    if args.format == "hf":
        given = [flag for flag, value in (("--type", args.type != "F16"), ("--adapter", args.adapter),
                                          ("--quantizer", args.quantizer)) if value]
        if given:
            from automodel.errors import UserError

            raise UserError(f"automodel export: {given[0]} needs --format gguf")
    else:
        given = [flag for flag, value in (("--trust-pickled-state", args.trust_pickled_state),
                                          ("--allow-target", args.allow_target)) if value]
        if given:  # --format gguf reads saved model folders (safetensors), never a step's pickled training state
            from automodel.errors import UserError

            raise UserError(f"automodel export: {given[0]} applies to --format hf only")
        from transformers.utils import logging as hf_logging

        from automodel.gguf_out import export_gguf

        hf_logging.disable_progress_bar()
        print(export_gguf(args.step_dir, args.output, args.type, args.adapter, args.quantizer,
                          args.trust_remote_code))
        return 0
    from automodel.checkpoint.export import export_step

    print(export_step(args.step_dir, args.output, args.trust_pickled_state, tuple(args.allow_target),
                      args.trust_remote_code))
    return 0

"""Shared pieces of the after-training commands: a parser whose errors are one line, common options, startup."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from automodel.errors import UserError


class CommandParser(argparse.ArgumentParser):
    """argparse that reports bad usage as a UserError (one line, exit 2) instead of printing usage text."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def new_parser(prog: str, description: str, epilog: str | None = None) -> CommandParser:
    return CommandParser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint_dir (its LATEST step), step folder, model or adapter folder, "
                                      "or hub id")
    parser.add_argument("--adapter", help="a LoRA adapter folder (or LoRA checkpoint) to put on MODEL")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: the compute dtype of the training run's precision on this "
                             "device: bfloat16 where it computes bf16 natively, unless the run said fp32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off)")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors in your input")


def start(args: argparse.Namespace) -> None:
    """Logging as `finetune` sets it up, and no download progress bars."""
    from transformers.utils import logging as hf_logging

    setup_logging(args.log_level)
    hf_logging.disable_progress_bar()


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record comes (tqdm's redirection and pytest swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[_StdoutHandler()], force=True)
    # Third-party libraries speak only when something is wrong.
    for noisy in ("transformers", "datasets", "torch.distributed", "httpx", "huggingface_hub", "filelock",
                  "matplotlib", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Warnings that say nothing to a user of this tool: prompts longer than the model's context are
    # truncated by the dataset builder afterwards, and the deprecations are between our dependencies.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    # peft imports bitsandbytes wherever it is installed; on a CPU it then warns at import that an optional kernel
    # package is missing, in every run, QLoRA or not.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
    # A single process saves its training state with torch.distributed.checkpoint too; that is intended.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                            category=UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # datasets' own bars ("Generating train split") would add stderr lines around a one-line error; automodel
    # reports what it read in its log. Its JSON reader logs a parse error that automodel reports itself, in one line.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is first imported
    if "datasets" in sys.modules:  # already imported (the CLI called in-process): switch its bars off directly
        sys.modules["datasets"].disable_progress_bars()
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)

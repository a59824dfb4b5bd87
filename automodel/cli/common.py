"""Shared pieces of the after-training commands: a parser whose errors are one line, common options, startup."""

from __future__ import annotations

import argparse

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
                        help="weights dtype (default: the training run's, else float32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off)")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors in your input")


def start(args: argparse.Namespace) -> None:
    """Logging as `finetune` sets it up, and no download progress bars."""
    from transformers.utils import logging as hf_logging

    from automodel.cli.main import setup_logging

    setup_logging(args.log_level)
    hf_logging.disable_progress_bar()

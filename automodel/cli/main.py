"""`automodel` command line. Imports nothing heavy until a command runs, so `--help` answers at once.

    automodel finetune llm -c CONFIG.yaml [--section.key value ...]
    automodel kd llm -c CONFIG.yaml [--section.key value ...]
    automodel CONFIG.yaml [--section.key value ...]        (the YAML's `recipe:` key names the recipe)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from automodel.cli.common import CommandParser, setup_logging
from automodel.config.sections import SECTIONS
from automodel.distributed.launcher import WorkersFailed, add_launcher_arguments, launch_if_requested, run_worker
from automodel.errors import TrainingStopped, UserError

RECIPES = {"llm_finetune": "fine-tune a causal LM with LoRA (peft section) or full SFT",
           "llm_kd": "knowledge distillation: fine-tune a student against a frozen teacher_model's distribution"}
# recipe -> "module:class" (imported only when that recipe runs)
RECIPE_CLASSES = {"llm_finetune": "automodel.training.recipe:FinetuneRecipe", "llm_kd": "automodel.training.kd:KDRecipe"}
COMMANDS = {("finetune", "llm"): "llm_finetune", ("kd", "llm"): "llm_kd"}
# Commands that parse their own options: name -> "module:function", called with the remaining argv.
TOOLS = {
    "generate": "automodel.cli.generate:main",
    "eval": "automodel.cli.evaluate:main",
    "merge-lora": "automodel.cli.merge:main",
    "push": "automodel.cli.push:main",
    "serve": "automodel.cli.serve:main",
    "export": "automodel.cli.export:main",
    "plot": "automodel.cli.plot:main",
}

USAGE = """automodel: fine-tune Hugging Face causal language models from one YAML file.

usage:
  automodel finetune llm -c CONFIG.yaml [--section.key VALUE ...]
  automodel kd llm -c CONFIG.yaml [--section.key VALUE ...]   knowledge distillation from a teacher_model
  automodel CONFIG.yaml [--section.key VALUE ...]      (the YAML's `recipe:` key names the recipe)
  automodel export STEP_DIR [--output DIR]             (HF model folder from any checkpoint step)
  automodel export MODEL --format gguf --output F.gguf  one GGUF file for llama.cpp / Ollama (--type Q8_0 ...)
  automodel models [--markdown]                        the supported architectures and their status
  automodel plot CHECKPOINT_DIR [--output PNG]         (loss, lr, tokens/s of a run as a picture)
  automodel generate MODEL --prompt TEXT               (also --prompts-file, --squad)
  automodel eval squad MODEL [--limit N]               exact match / F1 by generation
  automodel merge-lora MODEL --output DIR              base + LoRA adapter -> one model folder
  automodel push MODEL --repo-id USER/NAME             upload to the Hugging Face Hub with a model card
  automodel serve MODEL --output DIR                   prepare for vLLM, print (or --run) its server
  (MODEL: a checkpoint_dir, step folder, model or adapter folder, or hub id; `automodel COMMAND --help`)

options:
  -c, --config PATH     the recipe YAML
  --section.key VALUE   override any config key (also --section.key=VALUE); values parse as YAML
  --log-level LEVEL     DEBUG, INFO (default), WARNING or ERROR
  --debug               show tracebacks for errors in your input
  --allow-target PREFIX let config `_target_`s come from PREFIX too (your own code; repeatable; docs/security.md)
  -h, --help            this help; `automodel finetune llm --help` lists the config sections

several processes (torchrun; not needed under torchrun or srun, which start the workers themselves):
  --nproc-per-node N    workers per node, e.g. one per GPU
  --nnodes M --node-rank R --master-addr HOST --master-port PORT    several nodes (or --rdzv-endpoint HOST:PORT)

example:
  automodel finetune llm -c examples/llm_finetune/stories260K_squad_peft.yaml --step_scheduler.max_steps 10
"""


def _sections_help(command: tuple[str, ...]) -> str:
    width = max(map(len, SECTIONS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, text in SECTIONS.items())
    if command == ("kd", "llm"):
        what = ("Knowledge distillation: fine-tune a student (`model`; LoRA with a `peft` section, else full) with\n"
                "loss = (1 - kd_ratio) x cross-entropy + kd_ratio x T^2 x KL(teacher || student) per label token,\n"
                "from a frozen `teacher_model` with the same vocabulary; see examples/llm_kd/.")
    else:
        what = ("Fine-tune a causal LM: LoRA when the config has a `peft` section, full SFT otherwise; "
                "see examples/llm_finetune/.")
    return f"""usage: automodel {' '.join(command)} -c CONFIG.yaml [--section.key VALUE ...]

{what}
Any key can be overridden: --step_scheduler.max_steps 10, --model.pretrained_model_name_or_path PATH.

config sections:
{rows}
"""


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = CommandParser(prog="automodel", add_help=False, allow_abbrev=False)
    parser.add_argument("-c", "--config")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--allow-target", action="append", default=[], metavar="PREFIX")
    parser.add_argument("--log-level", default=None, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_launcher_arguments(parser)
    return parser.parse_known_args(argv)


def _split_command(rest: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """Leading words that are not options or YAML files form the command."""
    words = []
    while rest and not rest[0].startswith("-") and not rest[0].endswith((".yaml", ".yml")):
        words.append(rest.pop(0))
    return tuple(words), rest


def run_finetune(config_path: str, overrides: list[str], command_recipe: str | None,
                 log_level_flag: str | None = None, allow_targets: tuple[str, ...] = ()) -> int:
    from automodel.config.redact import without_environment_values
    from automodel.config.switches import load_person_config

    # The file's trust switches count only when the person gave them too (config/switches.py).
    unresolved = load_person_config(config_path, overrides, allow_targets)
    try:
        return _run_finetune(config_path, unresolved, command_recipe, log_level_flag, allow_targets)
    except UserError as err:  # a message that echoes a value read from the environment names its variable
        raise UserError(without_environment_values(str(err), unresolved)) from None


def _run_finetune(config_path: str, unresolved: dict, command_recipe: str | None, log_level_flag: str | None,
                  allow_targets: tuple[str, ...]) -> int:
    from automodel.config import check_sections, interpolate

    cfg = interpolate(unresolved)
    check_sections(cfg)  # the shape of each section, before `logging` is read; the recipe's constructor checks
    # their contents (training/settings.py) before it builds anything.
    config_level = (cfg.get("logging") or {}).get("level")
    # --log-level wins over logging.level; a bad value is reported when the recipe reads the section.
    if log_level_flag is None and str(config_level).upper() in ("DEBUG", "INFO", "WARNING", "ERROR"):
        logging.getLogger("automodel").setLevel(str(config_level).upper())
    recipe = cfg.get("recipe", command_recipe)
    if recipe is None:
        raise UserError(f"{config_path}: no 'recipe:' key; add `recipe: llm_finetune` (or llm_kd) or run "
                        "`automodel finetune llm -c CONFIG`")
    if recipe not in RECIPES:
        from automodel.config import did_you_mean

        raise UserError(f"recipe: unknown recipe '{recipe}'{did_you_mean(recipe, RECIPES)}; known: {', '.join(RECIPES)}")
    if command_recipe is not None and recipe != command_recipe:
        raise UserError(f"recipe: the config says '{recipe}' but the command runs '{command_recipe}'")
    import importlib

    from transformers.utils import logging as hf_logging

    from automodel.training.host_memory import return_freed_memory_promptly

    module, name = RECIPE_CLASSES[recipe].split(":")
    recipe_class = getattr(importlib.import_module(module), name)
    hf_logging.disable_progress_bar()
    return_freed_memory_promptly()
    run_worker(lambda: recipe_class(cfg, allow_targets, unresolved).run())
    return 0


def run_tool(name: str, argv: list[str]) -> int:
    import importlib

    module, function = TOOLS[name].split(":")
    return getattr(importlib.import_module(module), function)(argv)


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] in TOOLS:
        setup_logging("DEBUG" if "--debug" in argv else "INFO")
        return run_tool(argv[0], [a for a in argv[1:] if a != "--debug"])
    args, rest = _parse(argv)
    command, rest = _split_command(rest)
    if command == ("models",):
        from automodel.cli.models_command import run_models

        return run_models(rest, args.help)
    if not command and not args.config and rest and rest[0].endswith((".yaml", ".yml")):
        args.config = rest.pop(0)  # short form: automodel CONFIG.yaml
    if args.help:
        print(_sections_help(command) if command in COMMANDS else USAGE, end="")
        return 0
    if command and command not in COMMANDS:
        from automodel.config import did_you_mean

        known = [" ".join(c) for c in COMMANDS] + list(TOOLS)
        raise UserError(f"unknown command '{' '.join(command)}'{did_you_mean(' '.join(command), known)}; "
                        f"known: {', '.join(known)} (see automodel --help)")
    if not args.config:
        if not command and not rest:
            print(USAGE, end="")
            return 2
        raise UserError("no config given: use -c CONFIG.yaml (see automodel --help)")
    if not Path(args.config).is_file():
        raise UserError(f"config file not found: {args.config}")
    setup_logging(args.log_level or "INFO")
    launched = launch_if_requested(args, argv, rest, COMMANDS.get(command))
    if launched is not None:
        return launched
    return run_finetune(args.config, rest, COMMANDS.get(command), args.log_level, tuple(args.allow_target))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return dispatch(argv)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 1
    except WorkersFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

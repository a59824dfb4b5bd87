"""Which callables a config's `_target_` may name.

A `_target_` is called with the config's keys, so a config that could name any importable callable would be a
program (`_target_: os.system` runs a shell command). By default a target must lie inside one of
`DEFAULT_ALLOWED` (what recipes build: this package's builders, optimizers, modules, data loaders, models and
tokenizers). A user widens the list on purpose, each time with a warning in the log:
- `--allow-target PREFIX` on the command line (repeatable);
- the `AUTOMODEL_ALLOW_TARGETS` environment variable (comma-separated prefixes);
- `--allow_targets [PREFIX, ...]` as a command-line override. The same key in a config FILE widens nothing: a
  file may come from someone else, so config/switches.py stops it unless the person granted each prefix already.
A target names one public class or function (or a method of such a class) by the module it lives in: the module
is imported and the name taken from it, never reached through another module's attributes
(`automodel.config.trust.os.system` is refused), and what is reached must be defined inside the trusted packages.
A few callables inside them load code, unpickle or start processes by design; `DENIED` refuses those by name.
See docs/security.md.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from automodel.errors import UserError

logger = logging.getLogger("automodel")

# Prefixes at dotted-name boundaries: `torch.optim` allows torch.optim.AdamW, not torch.optimx. Only the parts of
# torch that recipes build are listed: torch also holds callables that load pickles or compile and run code
# (torch.load, torch.hub, torch.utils.cpp_extension).
DEFAULT_ALLOWED: tuple[str, ...] = ("automodel", "torch.optim", "torch.nn", "torch.utils.data", "torchdata",
                                    "transformers", "peft", "datasets")
ENV_VAR = "AUTOMODEL_ALLOW_TARGETS"
CONFIG_KEY = "allow_targets"
HOW_TO_ALLOW = "if it is your own code, allow it with --allow-target PREFIX (see docs/security.md)"
# Inside the trusted packages, what imports code, executes a string, unpickles or starts a process by design
# (fnmatch patterns over dotted names, matched at dotted boundaries). Checked against the target as written and
# against where the resolved callable is defined, so a re-export (`transformers.get_class_from_dynamic_module`)
# is refused too. tests/test_target_reach.py enumerates every callable a config can reach and fails when one that
# does any of these is not refused here.
DENIED: tuple[str, ...] = (
    "transformers.dynamic_module_utils",             # imports a model folder's own Python files
    "transformers.utils.import_utils",               # import machinery: modules and files by name
    "transformers.utils.generic.maybe_replace_from_package",  # imports the package it is given
    "transformers.cli", "transformers.commands",     # the transformers command line: servers, subprocesses
    "transformers.exporters",                        # imports the dotted paths it is given
    "transformers.pipelines",                        # classes by dotted path, ffmpeg subprocesses
    "transformers.integrations.hub_kernels",         # downloads kernels from the Hub and imports them
    "transformers.integrations.integration_utils",   # trackers and hyperparameter search: imports files
    "transformers.modeling_utils.load_state_dict",   # torch.load with the caller's weights_only
    "transformers.models.rag.retrieval_rag",         # pickle.load of an index
    "transformers.models.*.convert_*",               # conversion scripts: torch.load of any checkpoint
    "transformers.testing_utils",                    # subprocess runners
    "torch.utils.data.datapipes",                    # decoders that unpickle (pickle.loads, torch.load)
    "peft.utils.save_and_load.torch_load", "peft.utils.save_and_load.load_peft_weights",  # caller's weights_only
    "peft.tuners.lora.loraga.preprocess_loraga",     # torch.load of a cache file
    "datasets.load.import_main_class", "datasets.load.get_dataset_builder_class",  # import a module by name
    "datasets.streaming", "datasets.utils.patching",  # import modules by name
    "automodel.config",                              # the config machinery: builds targets, widens the policy
    "automodel.cli", "automodel.__main__",           # every command, with its own trust flags
    "automodel.distributed.launcher",                # starts torchrun workers
    "automodel.inference.vllm_runtime",              # starts vLLM's interpreter
    "automodel.checkpoint",                          # DCP training state is unpickled
    "automodel.logging.backends",                    # imports the tracker module it is given
    "automodel.training.host_memory",                # loads libc through ctypes (the CLI's allocator phases)
    "automodel.gguf_out.llamacpp",                   # starts llama.cpp's quantizer
)


def is_allowed(dotted: str, prefixes: Iterable[str]) -> bool:
    return any(dotted == prefix or dotted.startswith(prefix + ".") for prefix in prefixes)


def denied_by(dotted: str) -> str | None:
    """The `DENIED` pattern that covers `dotted`, if any."""
    return next((pattern for pattern in DENIED
                 if fnmatch.fnmatchcase(dotted, pattern) or fnmatch.fnmatchcase(dotted, pattern + ".*")), None)


def _is_stdlib(prefix: str) -> bool:
    return prefix.split(".")[0] in sys.stdlib_module_names or prefix.split(".")[0] == "builtins"


def _checked_prefixes(values: Any, where: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in values):
        raise UserError(f"{where}: expected a list of package prefixes such as [my_project.losses], got {values!r}")
    return [v.strip().strip(".") for v in values]


@dataclass(frozen=True)
class TargetPolicy:
    """The prefixes a `_target_` may start with."""

    prefixes: tuple[str, ...] = DEFAULT_ALLOWED

    def check(self, dotted: Any, key: str) -> None:
        if isinstance(dotted, str) and not is_allowed(dotted, self.prefixes):
            raise UserError(f"{key}._target_: '{dotted}' is not in the trusted packages "
                            f"({', '.join(self.prefixes)}); {HOW_TO_ALLOW}")
        if isinstance(dotted, str):
            check_not_denied(dotted, key)

    def check_config(self, cfg: dict[str, Any]) -> None:
        """Every `_target_` in `cfg`, before anything is built."""
        for key, dotted in find_targets(cfg):
            self.check(dotted, key)


def check_not_denied(dotted: str, key: str, written: str | None = None) -> None:
    """`dotted` (or the callable `written` resolved to) is not one of the code loaders in `DENIED`."""
    pattern = denied_by(dotted)
    if pattern is not None:
        shown = f"'{written}' is {dotted}, which" if written and written != dotted else f"'{dotted}'"
        raise UserError(f"{key}._target_: {shown} loads or runs code by design ({pattern} is never a config "
                        "target, see docs/security.md)")


def find_targets(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(config key of the section, target) for each `_target_` anywhere in `node`."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == "_target_" and key:
                yield key, value
            elif name == "_target_":
                yield "(top level)", value
            else:
                yield from find_targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from find_targets(value, f"{key}[{index}]")


def target_policy(cfg: dict[str, Any] | None = None, cli: Iterable[str] = (),
                  environ: dict[str, str] | None = None, log: bool = True) -> TargetPolicy:
    """Defaults plus what the user allowed: the command line, the environment and the config's `allow_targets`."""
    environ = os.environ if environ is None else environ
    widened: list[tuple[str, str]] = [(p, "--allow-target") for p in _checked_prefixes(list(cli), "--allow-target")]
    if environ.get(ENV_VAR, "").strip():
        widened += [(p, ENV_VAR) for p in _checked_prefixes([p for p in environ[ENV_VAR].split(",") if p.strip()],
                                                             ENV_VAR)]
    from_config = (cfg or {}).get(CONFIG_KEY)
    if from_config is not None:
        granted = DEFAULT_ALLOWED + tuple(p for p, _ in widened)
        for prefix in _checked_prefixes(from_config, CONFIG_KEY):
            if is_allowed(prefix, granted):
                continue  # already trusted: the key widens nothing
            if _is_stdlib(prefix):
                raise UserError(f"{CONFIG_KEY}: '{prefix}' is in the Python standard library, which a config file "
                                f"cannot allow; if you mean it, run with --allow-target {prefix}")
            widened.append((prefix, CONFIG_KEY))
    extra = [p for p, _ in widened if p not in DEFAULT_ALLOWED]
    if log and widened:
        logger.warning("trusting config targets outside the defaults: %s (code in them runs as you)",
                       ", ".join(f"{p} (from {source})" for p, source in widened))
    return TargetPolicy(DEFAULT_ALLOWED + tuple(dict.fromkeys(extra)))

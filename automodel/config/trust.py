"""Which callables a config's `_target_` may name.

A `_target_` is called with the config's keys, so a config that could name any importable callable would be a
program (`_target_: os.system` runs a shell command). By default a target must lie inside one of
`DEFAULT_ALLOWED` (what recipes build: this package's builders, optimizers, modules, data loaders, models and
tokenizers). A user widens the list on purpose, each time with a warning in the log:
- `--allow-target PREFIX` on the command line (repeatable);
- the `AUTOMODEL_ALLOW_TARGETS` environment variable (comma-separated prefixes);
- the config's top-level `allow_targets: [PREFIX, ...]`. A config may come from someone else, so this key can
  allow the user's own packages but not the Python standard library (os, subprocess, builtins, ...): those
  only the person running the command can allow, with the flag or the variable.
See docs/security.md.
"""

from __future__ import annotations

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


def is_allowed(dotted: str, prefixes: Iterable[str]) -> bool:
    return any(dotted == prefix or dotted.startswith(prefix + ".") for prefix in prefixes)


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

    def check_config(self, cfg: dict[str, Any]) -> None:
        """Every `_target_` in `cfg`, before anything is built."""
        for key, dotted in find_targets(cfg):
            self.check(dotted, key)


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
        for prefix in _checked_prefixes(from_config, CONFIG_KEY):
            if _is_stdlib(prefix):
                raise UserError(f"{CONFIG_KEY}: '{prefix}' is in the Python standard library, which a config file "
                                f"cannot allow; if you mean it, run with --allow-target {prefix}")
            widened.append((prefix, CONFIG_KEY))
    extra = [p for p, _ in widened if p not in DEFAULT_ALLOWED]
    if log and widened:
        logger.warning("trusting config targets outside the defaults: %s (code in them runs as you)",
                       ", ".join(f"{p} (from {source})" for p, source in widened))
    return TargetPolicy(DEFAULT_ALLOWED + tuple(dict.fromkeys(extra)))

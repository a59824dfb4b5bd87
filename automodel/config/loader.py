"""Read a recipe YAML, apply command-line overrides and resolve `${...}` interpolation.

The result is a plain nested dict. Building objects from it is `instantiate.py`'s job; checking
section names against the recipe's contract is `sections.py`'s.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from automodel.errors import UserError

# `${oc.env:VAR,default}` (OmegaConf spelling, which NeMo AutoModel configs use) or `${VAR,default}`.
_INTERPOLATION = re.compile(r"\$\{(?:oc\.env:)?([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-4` as the float users mean (YAML 1.1, which PyYAML follows, wants a dot:
    `1.0e-4`; YAML 1.2 and every other YAML reader take both)."""


ConfigLoader.add_implicit_resolver(  # copies SafeLoader's resolver table: yaml.safe_load is unchanged
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Safe-load a YAML mapping; a missing file or a syntax error is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = read_yaml(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; expected a YAML config") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a folder; expected a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"YAML syntax error in {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping of sections at the top level, got {type(data).__name__}")
    return data


def parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would: 10 -> int, 1e-4 -> float, true -> bool, [1, 2] -> list."""
    try:
        return read_yaml(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Turn ['--a.b', '1', '--c.d=x'] into [('a.b', 1), ('c.d', 'x')]."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument '{arg}': overrides look like --section.key value or --section.key=value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        else:
            raise UserError(f"override --{key} has no value: use --{key} VALUE or --{key}=VALUE")
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
            raise UserError(f"override --{key}: expected a dotted key such as --step_scheduler.max_steps")
        pairs.append((key, parse_scalar(raw)))
    return pairs


def apply_overrides(cfg: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in place; intermediate mappings are created, a scalar in the way is an error."""
    for key, value in overrides:
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"override --{key}: '{where}' is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return cfg


def variables_named(text: str) -> list[str]:
    """The environment variables a string's `${...}` expressions read."""
    return [match.group(1) for match in _INTERPOLATION.finditer(text)]


def interpolate(value: Any) -> Any:
    """Replace `${oc.env:VAR,default}` / `${VAR,default}` in every string, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise UserError(f"environment variable {name} is not set and '{match.group(0)}' gives no default")
        return default.strip()

    resolved = _INTERPOLATION.sub(lookup, value)
    if "${" in resolved:
        raise UserError(f"cannot resolve '{value}': use ${{oc.env:VAR,default}} or ${{VAR,default}}")
    # A value that was one whole interpolation takes its YAML type (`${STEPS,10}` -> 10).
    return parse_scalar(resolved) if _INTERPOLATION.fullmatch(value) else resolved


def load_unresolved_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """YAML, then overrides, with `${...}` left as written: what a run writes down (config/redact.py)."""
    cfg = load_yaml(path)
    return apply_overrides(cfg, parse_overrides(overrides or []))


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved config: YAML, then overrides, then interpolation (so overrides may use `${...}` too)."""
    return interpolate(load_unresolved_config(path, overrides))

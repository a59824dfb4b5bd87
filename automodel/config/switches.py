"""The switches that turn a safety check off come from the person running the command, never from a config file.

A config file may come from someone else, and the file being distrusted must not be what switches the checks off.
So these keys, at any depth of a config FILE (`model.trust_remote_code`, or a `_target_`'s own keyword), stop the
command with one line that says how to grant them, unless the person gave the same key on the command line
(`--model.trust_remote_code true`), which replaces the file's value:
- `trust_remote_code` other than false: runs a model repo's own Python code;
- `trust_pickled_state` other than false: unpickles a checkpoint's training state;
- `weights_only` other than true, `allow_pickle` other than false: unpickle weights files;
- `allow_targets`: widens the packages a `_target_` may name; in a file only prefixes the person already allowed
  (`--allow-target`, AUTOMODEL_ALLOW_TARGETS) pass, as they widen nothing.
The commands that read a step's saved `config.yaml` (export, eval, generate, serve, merge-lora) apply the same rule
with their own flags (`--trust-remote-code`, `--allow-target`). See docs/security.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from automodel.config.loader import apply_overrides, load_yaml, parse_overrides
from automodel.config.trust import CONFIG_KEY, DEFAULT_ALLOWED, ENV_VAR, is_allowed
from automodel.errors import UserError


def _not_false(value: Any) -> bool:
    return value is not None and value is not False


def _not_true(value: Any) -> bool:
    return value is not None and value is not True


# key -> whether its value turns a check off
SWITCHES = {"trust_remote_code": _not_false, "trust_pickled_state": _not_false, "weights_only": _not_true,
            "allow_pickle": _not_false}


def find_switches(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, value) of every switch key that turns its check off, anywhere in `node`."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name in SWITCHES and SWITCHES[name](value):
                yield (*path, name), value
            else:
                yield from find_switches(value, (*path, name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from find_switches(value, (*path, index))


def dotted(path: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


def person_targets(cli: Iterable[str] = (), environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The `_target_` prefixes trusted without the config: the defaults, --allow-target and AUTOMODEL_ALLOW_TARGETS."""
    environ = os.environ if environ is None else environ
    from_env = [p.strip().strip(".") for p in environ.get(ENV_VAR, "").split(",") if p.strip()]
    return DEFAULT_ALLOWED + tuple(p.strip().strip(".") for p in cli if p.strip()) + tuple(from_env)


def _shadowed(path: tuple, person_keys: Iterable[tuple]) -> bool:
    """Whether the person's override of `key` (or of a section above it) replaced the file's value."""
    return any(path[: len(key)] == key for key in person_keys)


def check_file_switches(file_cfg: dict[str, Any], where: str, grant: dict[str, str],
                        person_keys: Iterable[tuple] = (), granted_targets: tuple[str, ...] = DEFAULT_ALLOWED) -> None:
    """Stop when the config file `where` turns a check off that the person did not turn off themselves.

    `grant` says, per switch key, how the person grants it (`{path}` is replaced by the key's dotted path)."""
    person_keys = [tuple(key) for key in person_keys]
    for path, value in find_switches(file_cfg):
        if not _shadowed(path, person_keys):
            how = grant.get(path[-1], grant["*"]).format(path=dotted(path))
            raise UserError(f"{dotted(path)}: {where} sets it to {value!r}, which turns a safety check off; a config "
                            f"file cannot, only you can: {how} (see docs/security.md)")
    prefixes = file_cfg.get(CONFIG_KEY)
    if prefixes is None or _shadowed((CONFIG_KEY,), person_keys):
        return
    for prefix in [prefixes] if isinstance(prefixes, str) else prefixes if isinstance(prefixes, list) else []:
        if isinstance(prefix, str) and prefix.strip() and not is_allowed(prefix.strip().strip("."), granted_targets):
            raise UserError(f"{CONFIG_KEY}: {where} widens the trusted packages to '{prefix}', which a config file "
                            f"cannot, only you can: pass --allow-target {prefix} (or set {ENV_VAR}) "
                            "(see docs/security.md)")


FINETUNE_GRANT = {"*": "pass --{path} on the command line", "trust_remote_code": "pass --{path} true",
                  "trust_pickled_state": "pass --{path} true", "weights_only": "pass --{path} false",
                  "allow_pickle": "pass --{path} true"}


def load_person_config(path: str | os.PathLike, overrides: list[str], allow_targets: Iterable[str] = (),
                       environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The unresolved config (the YAML, then the command-line overrides), after checking that every switch the
    file turns off was turned off by the person too."""
    file_cfg = load_yaml(path)
    pairs = parse_overrides(overrides)
    check_file_switches(file_cfg, str(path), FINETUNE_GRANT, [tuple(key.split(".")) for key, _ in pairs],
                        person_targets(allow_targets, environ))
    return apply_overrides(file_cfg, pairs)


def check_saved_config(cfg: dict[str, Any] | None, path: str | os.PathLike | None, trust_remote_code: bool,
                       allow_targets: Iterable[str] = (), environ: dict[str, str] | None = None) -> None:
    """A step's saved config.yaml, read by export, eval, generate, serve or merge-lora: its switches count only
    when the person running the command gave the command's own flag."""
    if not cfg or path is None:
        return
    grant = {"*": "remove it from the file (this command takes no flag for it)",
             "trust_remote_code": "pass --trust-remote-code"}
    # trust_pickled_state is the resumed run's own flag: these commands read no pickles (export has its own flag).
    saved = _without(cfg, "trust_pickled_state")
    if trust_remote_code:  # granted: the saved value is the person's wish now
        saved = _without(saved, "trust_remote_code")
    check_file_switches(saved, str(Path(path)), grant, (), person_targets(allow_targets, environ))


def _without(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return {k: _without(v, key) for k, v in node.items() if k != key}
    if isinstance(node, list):
        return [_without(v, key) for v in node]
    return node

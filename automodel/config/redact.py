"""The config as it may be written down: no secrets at rest.

What a run writes about its config (the step folders' config.yaml, the trackers' parameters, the model card that
`automodel push` uploads) is the config *before* `${oc.env:VAR}` interpolation, so a value read from the
environment stays an expression naming its variable; readers resolve it again (`read_run_config`). Values of keys
that look like secrets (token, api_key, password, secret, ...) are replaced by REDACTED wherever they are written.
"""

from __future__ import annotations

import os
import re
from typing import Any

from automodel.config.loader import interpolate, load_yaml, variables_named
from automodel.errors import UserError

REDACTED = "<redacted>"
# Matched against the last `_`-separated words of a key: `hf_token`, `api_key`, `db_password`, `client_secret`.
_SECRET_KEY = re.compile(r"(?:^|_)(token|key|apikey|password|passwd|secret|credentials?|auth)$", re.IGNORECASE)
# Keys that end like a secret but name tokenizer vocabulary or structure, not credentials.
_NOT_SECRET = re.compile(r"(?:^|_)(pad|bos|eos|unk|sep|cls|mask|add_bos|add_eos|special|sort|text|prompt|answer|"
                         r"label|context|question|input|output|response|instruction|image|column)_(token|key)$",
                         re.IGNORECASE)


def is_secret_key(name: Any) -> bool:
    return isinstance(name, str) and bool(_SECRET_KEY.search(name)) and not _NOT_SECRET.search(name)


def redact(node: Any) -> Any:
    """A copy of `node` with the values of secret-looking keys replaced (an unresolved `${...}` is kept: it names
    a variable, not its value)."""
    if isinstance(node, dict):
        return {k: REDACTED if is_secret_key(k) and _holds_value(v) else redact(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    return node


def _holds_value(value: Any) -> bool:
    if value is None or value == "" or isinstance(value, bool):
        return False
    return not (isinstance(value, str) and value.startswith("${") and value.endswith("}"))


def config_at_rest(unresolved: dict[str, Any]) -> dict[str, Any]:
    """What may be written or logged of a config: before interpolation, secret-looking keys redacted."""
    return redact(unresolved)


def read_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """A run's saved config.yaml with its `${oc.env:VAR}` expressions resolved again from this environment."""
    try:
        return interpolate(load_yaml(path))
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


# Shorter environment values (a step count, `true`) would match unrelated text in a message.
MIN_SCRUBBED_LENGTH = 4


def environment_values(unresolved: Any) -> dict[str, str]:
    """{value: `${oc.env:VAR}`} for every variable the config reads, so a message can name the variable instead."""
    found: dict[str, str] = {}
    if isinstance(unresolved, dict):
        for value in unresolved.values():
            found.update(environment_values(value))
    elif isinstance(unresolved, list):
        for value in unresolved:
            found.update(environment_values(value))
    elif isinstance(unresolved, str):
        for name in variables_named(unresolved):
            value = os.environ.get(name)
            if value is not None and len(value) >= MIN_SCRUBBED_LENGTH:
                found[value] = f"${{oc.env:{name}}}"
    return found


def without_environment_values(text: str, unresolved: Any) -> str:
    """`text` (an error message) with the values the config read from the environment written as their
    expressions: an error that echoes a bad value must not print a token."""
    for value, expression in sorted(environment_values(unresolved).items(), key=lambda item: -len(item[0])):
        text = text.replace(value, expression)
    return text

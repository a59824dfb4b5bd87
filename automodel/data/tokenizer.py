"""The options a config may set on the tokenizer a run uses for its data (and saves with the model).

automodel/training/tokenizer.py `build_tokenizer` loads it (from the model's source unless `tokenizer:` or
`dataset.tokenizer:` names another) and applies them here. Options: `add_bos`, `add_eos` (what the tokenizer adds
around a text), `padding_side` and `chat_template` (a Jinja string or a path to a `.jinja` file). They are set on the tokenizer
object itself, so the data builders see them and `save_pretrained` writes them next to the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from automodel.errors import UserError

logger = logging.getLogger(__name__)

OPTION_KEYS = ("add_bos", "add_eos", "padding_side", "chat_template")


def apply_tokenizer_options(tokenizer, add_bos: bool | None = None, add_eos: bool | None = None,
                            padding_side: str | None = None, chat_template: str | None = None,
                            key: str = "tokenizer"):
    """Set the options that are given (None leaves the tokenizer's own setting) and return the tokenizer."""
    for name, value in (("add_bos", add_bos), ("add_eos", add_eos)):
        if value is not None and not isinstance(value, bool):
            raise UserError(f"{key}.{name}: expected true or false, got {value!r}")
    if add_bos and tokenizer.bos_token_id is None:
        raise UserError(f"{key}.add_bos: the tokenizer has no BOS token to add")
    if add_bos is not None or add_eos is not None:
        # Setting one flag rebuilds the post-processor from both flags, and a loaded tokenizer's flags need not
        # match what its tokenizer.json does (stories260K adds BOS with add_bos_token False): set both explicitly.
        prefix, suffix = special_token_affixes(tokenizer)
        bos = add_bos if add_bos is not None else tokenizer.bos_token_id in prefix
        eos = add_eos if add_eos is not None else tokenizer.eos_token_id in suffix
        tokenizer.add_bos_token = bos
        tokenizer.add_eos_token = eos
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise UserError(f"{key}.padding_side: expected 'left' or 'right', got {padding_side!r}")
        tokenizer.padding_side = padding_side
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template, f"{key}.chat_template")
    return tokenizer


def read_chat_template(value: Any, key: str) -> str:
    """A Jinja template given inline, or read from a `.jinja` / `.j2` file."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{key}: expected a Jinja template string or a path to a .jinja file, got {value!r}")
    if value.endswith((".jinja", ".j2")) and "{" not in value:
        path = Path(value).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"{key}: cannot read {path}: {error}") from error
    return value


def special_token_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when it adds special tokens (e.g. [bos], [])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise UserError("the tokenizer's special tokens could not be located around a plain text")

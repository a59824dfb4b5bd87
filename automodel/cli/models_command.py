"""`automodel models`: print the supported-models table (no torch import)."""

from __future__ import annotations

from automodel.errors import UserError

HELP = """usage: automodel models [--markdown]

Print every architecture of the supported-models table with its status: `tested` (a tiny model of it trains
with LoRA and full SFT in tests/models/test_architectures.py) or `not yet supported` (with the reason).

options:
  --markdown   print docs/supported_models.md instead (what each row verified, LoRA targets, notes)
"""


def run_models(rest: list[str], show_help: bool) -> int:
    if show_help:
        print(HELP, end="")
        return 0
    unknown = [arg for arg in rest if arg != "--markdown"]
    if unknown:
        raise UserError(f"automodel models: unknown argument {unknown[0]!r}; expected only --markdown")
    from automodel.models.table import markdown_page, text_table

    print(markdown_page() if "--markdown" in rest else text_table(), end="")
    return 0

"""Progress bars on rank 0 when stdout is a terminal; in CI and SLURM logs the plain log lines stand alone."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from automodel.logging.rank import is_main_process


def bars_wanted(enabled: bool = True) -> bool:
    return enabled and is_main_process() and sys.stdout.isatty()


def progress_bar(total: int | None, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar (steps done, rate, ETA) that is a silent no-op where bars are not wanted."""
    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=not bars_wanted(enabled), **kwargs)

"""Paths stay where they are put: names that become path components, files read or written under a folder.

Each check raises a one-line UserError naming the flag or file, before anything is written.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

from automodel.errors import UserError

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_STEP_NAME = re.compile(r"step_\d+")


def check_plain_name(name: str, key: str) -> str:
    """A name used as one folder component: letters, digits, `_ . -`, not starting with a dot (no `/`, no `..`)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise UserError(f"{key}: {name!r} must be a plain name (letters, digits, _ . -, not starting with '.'), "
                        "since it names a file or folder inside the output; it may not contain '/' or '..'")
    return name


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path`, links resolved, lies inside `folder` (or is it)."""
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(folder)))


def check_inside(path: Path, folder: Path, key: str) -> Path:
    if not is_inside(path, folder):
        raise UserError(f"{key}: {path} leads to {os.path.realpath(path)}, outside {folder}; only files inside "
                        "the folder are used")
    return path


def check_step_name(text: str, marker: Path) -> str:
    """What a LATEST file names must be a step folder next to it, never a path elsewhere."""
    name = text.strip()
    if not _STEP_NAME.fullmatch(name):
        raise UserError(f"{marker}: expected the name of a step folder (step_<N>), got {name[:80]!r}")
    return name


def check_not_link(path: Path, key: str) -> Path:
    """A file or folder automodel writes (or reads a checkpoint from) is itself, not a link to elsewhere."""
    if Path(path).is_symlink():
        raise UserError(f"{key}: {path} is a link to {os.path.realpath(path)}; automodel reads and writes the files "
                        "of its checkpoint and output folders in place, never through links: remove the link or "
                        "give the real folder")
    return Path(path)


def open_no_follow(path: Path, key: str, append: bool = False):
    """Open `path` for writing text without following a final symbolic link (a planted link would otherwise
    redirect the write to its target); a link is refused with one line."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            check_not_link(path, key)
        raise
    return os.fdopen(fd, "a" if append else "w")


def write_text_no_follow(path: Path, text: str, key: str) -> None:
    with open_no_follow(path, key) as handle:
        handle.write(text)


def check_output_folder(output: Path, key: str, inputs: Iterable[Path] = ()) -> Path:
    """An output folder is not a link (the files would land where it points), holds no links (a file written
    over one would land at its target) and is none of the folders read."""
    output = Path(output)
    if output.is_symlink():
        raise UserError(f"{key}: {output} is a link to {os.path.realpath(output)}; give the real folder")
    if output.is_dir():
        for dirpath, dirnames, filenames in os.walk(output):
            for name in sorted(dirnames + filenames):
                if (Path(dirpath) / name).is_symlink():
                    raise UserError(f"{key}: {Path(dirpath) / name} inside the output folder is a link to "
                                    f"{os.path.realpath(Path(dirpath) / name)}; writing over it would write there: "
                                    "remove it or write somewhere else")
    for source in inputs:
        if source is not None and Path(source).exists() and \
                (is_inside(output, Path(source)) or is_inside(Path(source), output)):
            raise UserError(f"{key}: {output} overlaps the input folder {source}; write somewhere else")
    return output

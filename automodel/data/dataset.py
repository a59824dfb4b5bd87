"""The tokenized SFT dataset shared by all data formats, plus helpers for reading local data files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from automodel.errors import UserError

# Local file names that count as a given split when `dataset_name` points at a directory.
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "dev", "val"),
    "test": ("test",),
}
DATA_FILE_SUFFIXES = (".json", ".jsonl")


class SFTDataset(Dataset):
    """Map-style dataset of `{"input_ids": list[int], "labels": list[int]}` items.

    `examples` keeps the raw rows (aligned with the items) for later evaluation; the counters say
    how many source rows were shortened or left out to fit `seq_length`.
    """

    def __init__(
        self,
        items: list[dict[str, list[int]]],
        examples: list[dict[str, Any]] | None = None,
        num_dropped: int = 0,
        num_truncated: int = 0,
    ):
        if examples is not None and len(examples) != len(items):
            raise ValueError(f"{len(examples)} examples for {len(items)} items; they must be aligned")
        for index, item in enumerate(items):
            if len(item["input_ids"]) != len(item["labels"]):
                raise ValueError(f"item {index}: input_ids and labels differ in length")
        self.items = items
        self.examples = examples if examples is not None else []
        self.num_dropped = num_dropped
        self.num_truncated = num_truncated

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        item = self.items[index]
        # A fresh dict, so a caller that edits its item cannot corrupt the dataset.
        return {"input_ids": item["input_ids"], "labels": item["labels"]}


def looks_like_local_path(name: str) -> bool:
    """True when `name` is meant as a file or folder rather than a hub id."""
    return (
        os.path.exists(os.path.expanduser(name))
        or name.endswith(DATA_FILE_SUFFIXES)
        or name.startswith(("/", ".", "~"))
    )


def resolve_data_file(name: str, split: str) -> Path:
    """The data file for `name`: the file itself, or the one file in a directory that matches `split`."""
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"dataset file not found: {path}")
    if path.is_file():
        return path
    return find_split_file(path, split)


def find_split_file(directory: Path, split: str) -> Path:
    aliases = SPLIT_ALIASES.get(split, (split,))
    candidates = sorted(
        child
        for child in directory.iterdir()
        if child.is_file()
        and child.name.endswith(DATA_FILE_SUFFIXES)
        and any(alias in child.name.lower() for alias in aliases)
    )
    if not candidates:
        wanted = "/".join(aliases)
        raise UserError(f"no .json/.jsonl file with '{wanted}' in its name in {directory} (split '{split}')")
    if len(candidates) > 1:
        names = ", ".join(child.name for child in candidates)
        raise UserError(f"several files in {directory} match split '{split}' ({names}); point dataset_name at one")
    return candidates[0]


def read_json_file(path: Path) -> Any:
    """A `.json` document, or a `.jsonl` file as a list of its rows."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from error
    if path.suffix == ".jsonl":
        lines = enumerate(text.splitlines(), start=1)
        return [parse_json(line, path, f"line {number}") for number, line in lines if line.strip()]
    return parse_json(text, path, None)


def parse_json(text: str, path: Path, where: str | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        location = f" {where}" if where else ""
        raise UserError(f"{path}{location} is not valid JSON: {error}") from error

"""Reading user data through `datasets`: a hub id, or local JSON / JSONL / parquet / CSV files (one, a list, a glob).

Each local file is loaded on its own so an error can name the file and the row. `datasets` caches the Arrow
conversion of each file (keyed by the file's path, size and mtime) and every later `.map` (keyed by the function
and its settings, tokenizer included), so tokenisation of large data runs once.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from automodel.data.dataset import looks_like_local_path
from automodel.errors import UserError

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Columns an encoder writes; DROP_REASON is "" for a kept row, else why it is left out.
DROP_REASON = "drop_reason"


@dataclass
class Part:
    """One source of rows: a local file or a hub split, with the label errors use."""

    label: str
    rows: Any  # datasets.Dataset or datasets.IterableDataset


def load_parts(dataset_name: str | list[str], split: str = "train", streaming: bool = False,
               dataset_config: str | None = None, cache_dir: str | None = None) -> list[Part]:
    """The sources named by `dataset_name`: local files (path, list of paths, glob, or a folder) or a hub id."""
    names = [dataset_name] if isinstance(dataset_name, str) else dataset_name
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"dataset_name: expected a hub id, a file, a glob or a list of files, got {dataset_name!r}")
    if len(names) == 1 and not looks_like_local_path(names[0]) and not glob.has_magic(names[0]):
        return [Part(f"{names[0]} (split {split})", load_hub(names[0], split, streaming, dataset_config, cache_dir))]
    return [Part(str(path), load_file(path, streaming, cache_dir)) for path in expand_files(names)]


def expand_files(names: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in names:
        expanded = os.path.expanduser(name)
        if glob.has_magic(expanded):
            matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"dataset_name: no file matches {name}")
            files.extend(matches)
        elif Path(expanded).is_dir():
            matches = sorted(p for p in Path(expanded).iterdir() if p.suffix in BUILDERS)
            if not matches:
                raise UserError(f"dataset_name: {name} holds no {'/'.join(BUILDERS)} file")
            files.extend(matches)
        elif Path(expanded).is_file():
            files.append(Path(expanded))
        else:
            raise UserError(f"dataset file not found: {name}")
    for path in files:
        if path.suffix not in BUILDERS:
            raise UserError(f"{path}: unsupported data file type '{path.suffix}'; expected one of {', '.join(BUILDERS)}")
    return files


def load_file(path: Path, streaming: bool, cache_dir: str | None):
    import datasets

    # An empty CSV cell is an empty string, as in JSON, not a missing value.
    options = {"keep_default_na": False} if path.suffix == ".csv" else {}
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty; expected {BUILDERS[path.suffix]} rows")
    try:
        return datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train",
                                     streaming=streaming, cache_dir=cache_dir, **options)
    # StopIteration: datasets' JSON reader finds no table at all (e.g. only whitespace).
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError, TypeError, StopIteration) as error:
        cause = error.__cause__ or error
        raise UserError(f"{path}: cannot read it as {BUILDERS[path.suffix]}: "
                        f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from error


def load_hub(name: str, split: str, streaming: bool, config: str | None, cache_dir: str | None):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming, cache_dir=cache_dir)
    except (ConnectionError, DatasetNotFoundError) as error:
        raise UserError(
            f"cannot load dataset '{name}' (split {split}) from the Hugging Face hub: the machine looks offline or "
            f"the id is wrong ({type(error).__name__}); point dataset_name at local files instead") from error


def column_names(part: Part) -> list[str]:
    names = part.rows.column_names
    if names is None:  # a streaming JSON file only knows its columns after the first row
        first = next(iter(part.rows), None)
        names = list(first) if first is not None else []
    return list(names)


def encode_parts(parts: list[Part], encoder: Callable, limit: int | None, what: str, seq_length: int | None):
    """Run `encoder` (a batched `datasets` map function taking (batch, indices, label)) over every part, drop the
    rows it marks, and return one dataset of `input_ids` + `labels` (map-style or streaming like the parts)."""
    import datasets

    encoded, total, remaining = [], 0, limit
    for part in parts:
        rows = part.rows
        if remaining is not None:
            if remaining <= 0:
                break
            rows = rows.take(remaining) if isinstance(rows, datasets.IterableDataset) \
                else rows.select(range(min(remaining, len(rows))))
            if not isinstance(rows, datasets.IterableDataset):
                remaining -= len(rows)
        encoded.append(map_part(rows, part.label, encoder))
        if not isinstance(rows, datasets.IterableDataset):
            total += len(rows)
    if not encoded:
        raise UserError(f"{what}: no rows to read")
    combined = encoded[0] if len(encoded) == 1 else datasets.concatenate_datasets(encoded)
    if isinstance(combined, datasets.IterableDataset):
        if limit is not None and len(parts) > 1:
            combined = combined.take(limit)
        return combined.filter(lambda reason: reason == "", input_columns=[DROP_REASON]).select_columns(
            ["input_ids", "labels"])
    too_long, invalid = report_drops(combined, what, total, seq_length)
    kept = combined.filter(lambda reasons: [r == "" for r in reasons], input_columns=[DROP_REASON], batched=True,
                           desc=f"dropping skipped rows of {what}").select_columns(["input_ids", "labels"])
    kept.num_dropped, kept.num_skipped = too_long, invalid
    return kept


def map_part(rows, label: str, encoder: Callable):
    import datasets

    options: dict[str, Any] = {"batched": True, "with_indices": True, "fn_kwargs": {"label": label},
                               "remove_columns": column_names(Part(label, rows))}
    if not isinstance(rows, datasets.IterableDataset):
        options["desc"] = f"tokenizing {Path(label).name}"
    return rows.map(encoder, **options)


def report_drops(dataset, what: str, total: int, seq_length: int | None) -> tuple[int, int]:
    reasons = list(dataset[DROP_REASON])
    too_long = sum(r == "too long" for r in reasons)
    invalid = sum(r not in ("", "too long") for r in reasons)
    first_invalid = next((r for r in reasons if r not in ("", "too long")), None)
    logger.info("%s: %d examples; %d dropped as longer than seq_length=%s; %d invalid rows skipped%s",
                what, total - too_long - invalid, too_long, seq_length, invalid,
                f" (first: {first_invalid})" if first_invalid else "")
    return too_long, invalid

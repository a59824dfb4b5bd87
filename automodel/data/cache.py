"""A cache of tokenized data for builders that do not go through `datasets` (SQuAD): one entry per
(source file, tokenizer, settings, builder code), so tokenisation of a large file runs once.

The key covers the source file's path, size and modification time (as `datasets` does), the tokenizer's
fingerprint (vocabulary, merges, normalizer, special tokens, options such as add_bos), every builder setting and
the builder's own source code, so any change there is a miss rather than a stale hit. Files are written
atomically. safetensors + JSON, not pickle: loading a cache entry never runs code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from automodel.errors import UserError

logger = logging.getLogger(__name__)

CACHE_ENV = "AUTOMODEL_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "automodel")) / "tokenized"


def cache_key(source: Path, tokenizer, settings: dict[str, Any], code_file: str) -> str:
    stat = source.stat()
    parts = {
        "source": [str(source.resolve()), stat.st_size, stat.st_mtime_ns],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
        "code": hashlib.sha256(Path(code_file).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides a tokenizer's ids: a fast tokenizer's whole serialization (vocabulary,
    merges, normalizer, pre-tokenizer, the post-processor that adds BOS/EOS), else its vocabulary and SentencePiece
    model; plus its class, options and special tokens. Written here rather than taken from `datasets`' `Hasher`:
    importing `datasets` for it cost 82 MB of resident memory in every run that never reads a hub dataset."""
    digest = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        sp_model = getattr(tokenizer, "sp_model", None)
        if sp_model is not None:
            digest.update(sp_model.serialized_model_proto())
    options = {"init": tokenizer.init_kwargs, "special": tokenizer.special_tokens_map,
               "add_bos": getattr(tokenizer, "add_bos_token", None),
               "add_eos": getattr(tokenizer, "add_eos_token", None),
               "chat_template": getattr(tokenizer, "chat_template", None)}
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cached(name: str, key: str, cache_dir: Path | None,
           build: Callable[[], tuple[list[dict[str, list[int]]], dict[str, Any]]]):
    """`build()`'s (items, meta), read back from `cache_dir` when there. Items (lists of token ids) are stored as
    flat int32 tensors in safetensors, `meta` as JSON; the safetensors file is written last and marks completion."""
    from safetensors import SafetensorError

    if cache_dir is None:
        return build()
    base = Path(cache_dir) / f"{name}-{key}"
    tensors_path, meta_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    if tensors_path.is_file() and meta_path.is_file():
        try:
            result = read_items(tensors_path), json.loads(meta_path.read_text(encoding="utf-8"))
            logger.info("tokenized data read from cache %s", tensors_path)
            return result
        except (OSError, ValueError, SafetensorError) as error:  # a damaged cache file is rebuilt, and said so
            logger.warning("ignoring unreadable cache %s (%s); tokenizing again", tensors_path, error)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # before tokenizing: a cache folder that cannot exist is a setting to fix
        raise UserError(f"dataset.cache_dir / {CACHE_ENV}: cannot create the cache folder {base.parent}: "
                        f"{error.strerror}") from None
    items, meta = build()
    write_atomically(meta_path, lambda path: Path(path).write_text(json.dumps(meta), encoding="utf-8"))
    write_atomically(tensors_path, lambda path: write_items(items, path))
    logger.info("tokenized data cached in %s", tensors_path)
    return items, meta


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_items(items: list[dict[str, list[int]]], path: str) -> None:
    import torch
    from safetensors.torch import save_file

    keys = sorted(items[0]) if items else []
    tensors = {"lengths": torch.tensor([len(item[keys[0]]) for item in items] if keys else [], dtype=torch.int64)}
    for key in keys:
        tensors[key] = torch.tensor([token for item in items for token in item[key]], dtype=torch.int32)
    save_file(tensors, path)


def read_items(path: Path) -> list[dict[str, list[int]]]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    lengths = tensors.pop("lengths").tolist()
    columns = {key: [chunk.tolist() for chunk in value.split(lengths)] for key, value in tensors.items()}
    return [{key: columns[key][i] for key in columns} for i in range(len(lengths))]

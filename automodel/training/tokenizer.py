"""The tokenizer a run uses for its data (and saves with the model): loaded from the model's source (models/) with
the options a config may set (data/tokenizer.py). It needs both layers, so it is built here, above them.

`tokenizer:` or `dataset.tokenizer:` is a path / hub id string, a mapping with `pretrained_model_name_or_path`
plus options, or a `_target_` mapping; without either, the model's own tokenizer.
"""

from __future__ import annotations

from typing import Any

from automodel.config import TargetPolicy, build
from automodel.data.tokenizer import OPTION_KEYS, apply_tokenizer_options
from automodel.errors import UserError
from automodel.models import load_tokenizer


def build_tokenizer(cfg: dict[str, Any], policy: TargetPolicy = TargetPolicy()):
    """The run's tokenizer: the model's unless `tokenizer:` or `dataset.tokenizer:` names another (a `_target_`
    from the packages `policy` trusts)."""
    dataset = cfg.get("dataset") or {}
    node, key = cfg.get("tokenizer"), "tokenizer"
    if node is None:
        node, key = dataset.get("tokenizer"), "dataset.tokenizer"
    if node is None:
        node, key = {}, "model"
    if isinstance(node, str):
        node = {"pretrained_model_name_or_path": node}
    if not isinstance(node, dict):
        raise UserError(f"{key}: expected a path, a hub id or a mapping, got {node!r}")
    options = {k: node[k] for k in OPTION_KEYS if k in node}
    rest = {k: v for k, v in node.items() if k not in OPTION_KEYS}
    if "_target_" in rest:
        tokenizer = build(rest, key, policy=policy)
    else:
        model_cfg = cfg.get("model") or {}
        if "pretrained_model_name_or_path" not in rest and model_cfg.get("gguf_file") is not None:
            rest["gguf_file"] = model_cfg["gguf_file"]  # the model's GGUF file holds its tokenizer too
        source = rest.pop("pretrained_model_name_or_path", model_cfg.get("pretrained_model_name_or_path"))
        tokenizer = load_tokenizer(source, trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
                                   key=f"{key}.pretrained_model_name_or_path", **rest)
    return apply_tokenizer_options(tokenizer, key=key, **options)

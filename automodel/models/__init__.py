"""Loading Hugging Face causal LMs and tokenizers.

The loaders are imported on first use, so `automodel.models.registry` (the supported-models table that
`automodel models` prints) reads without importing torch.
"""

__all__ = ["load_causal_lm", "load_tokenizer", "parse_dtype"]


def __getattr__(name: str):
    if name in __all__:
        from automodel.models import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'automodel.models' has no attribute {name!r}")

"""Loading Hugging Face causal LMs and tokenizers."""

from automodel.models.loader import load_causal_lm, load_tokenizer, parse_dtype

__all__ = ["load_causal_lm", "load_tokenizer", "parse_dtype"]

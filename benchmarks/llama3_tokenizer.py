"""The real Llama 3 tokenizer from the shared assets as a transformers tokenizer (no hub access needed).

assets/tokenizers/llama3/tokenizer.model is Meta's tiktoken file (128,000 BPE ranks). transformers reads it through
`TikTokenConverter` (needs `tiktoken`); the 256 special tokens (ids 128000-128255) and the BOS post-processor are
Llama 3's own, as in Meta's `tokenizer.py`.
"""

from __future__ import annotations

from pathlib import Path

NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
NUM_SPECIALS = 256


def llama3_special_tokens() -> list[str]:
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIALS - len(NAMED_SPECIALS))]
    return NAMED_SPECIALS + reserved


def load_llama3_tokenizer(tiktoken_file: Path):
    """A `PreTrainedTokenizerFast` equal to Llama 3's: BOS prepended, EOS `<|end_of_text|>`, pad
    `<|finetune_right_pad_id|>`."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = llama3_special_tokens()
    backend = TikTokenConverter(vocab_file=str(tiktoken_file), extra_special_tokens=specials).converted()
    bos = "<|begin_of_text|>"
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>", model_max_length=131072)

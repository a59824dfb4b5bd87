"""Split prompt and answer where the tokenizer splits their joined text.

Tokenizing a prompt and its answer separately is not what the model sees at inference time: with a byte-level BPE
tokenizer (GPT-2, Qwen, Llama 3, SmolLM2) a template that ends in a space gives `['Answer', ':', 'Ġ']` and the
answer then starts with a no-space piece (`['Den', 'ver']`) that pretraining text never put there, where the
joined text tokenizes as `['Answer', ':', 'ĠDenver']`. So the prompt + answer text is tokenized once and split at
a character position: the answer starts at the first token that ends past it.

That position is the end of the prompt a model is given at generation time, which must not depend on the answer:
the prompt less its trailing spaces (`generation_prompt`). A template's trailing space belongs to the answer's
first word in every tokenizer that marks word starts (`ĠDenver` in byte-level BPE, `▁Den` in sentencepiece), so
`Answer: ` is asked as `Answer:`. Where the tokenizer keeps the space apart from some answers (Llama 2's
sentencepiece splits ` 1960` into `▁`, `1`, ...), that space token is the answer's first, so training and
generation still see the same prompt tokens. A template whose end merges with the answer's first token into one
token (no space or newline between them) cannot be split and is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from automodel.errors import UserError
from automodel.logging.progress import progress_bar

logger = logging.getLogger(__name__)

# Tokenizing in chunks lets a progress bar show on large inputs.
CHUNK = 2000


@dataclass
class JoinedSplit:
    """One example tokenized as a whole: the prompt's and the answer's token ids, and the prompt's text."""

    prompt_ids: list[int]
    answer_ids: list[int]
    prompt_text: str


# Names this split rule; it is part of the tokenized-data cache keys (SQuAD's cache, the fingerprint `datasets`
# takes of an encoder's attributes), so data tokenized under another rule is never read back.
SPLIT_RULE = "joined-text"


def split_joined(tokenizer, prompts: list[str], answers: list[str], progress: bool = False) -> list[JoinedSplit]:
    """Tokenize each `prompt + answer` without special tokens and split it where `generation_prompt(prompt)` ends;
    a split whose prompt tokens end elsewhere is a template error (see the module docstring)."""
    if not tokenizer.is_fast:
        raise UserError(f"the tokenizer ({type(tokenizer).__name__}) gives no character offsets; prompt and answer "
                        "cannot be split where the tokenizer splits their joined text (use a fast tokenizer)")
    splits = []
    with progress_bar(len(prompts), "tokenizing", progress, unit="texts") as bar:
        for start in range(0, len(prompts), CHUNK):
            chunk_prompts, chunk_answers = prompts[start:start + CHUNK], answers[start:start + CHUNK]
            encoded = tokenizer([p + a for p, a in zip(chunk_prompts, chunk_answers)], add_special_tokens=False,
                                return_offsets_mapping=True, return_attention_mask=False,
                                return_token_type_ids=False)
            for prompt, ids, offsets in zip(chunk_prompts, encoded["input_ids"], encoded["offset_mapping"]):
                splits.append(split_at(prompt, len(generation_prompt(prompt)), ids, offsets))
            bar.update(len(chunk_prompts))
    return splits


def split_at(prompt: str, prompt_end: int, ids: list[int], offsets: list[tuple[int, int]]) -> JoinedSplit:
    """The split of one joined tokenization: the answer starts at the first token ending past `prompt_end`."""
    boundary = next((i for i, (_, end) in enumerate(offsets) if end > prompt_end), len(ids))
    last_prompt_char = offsets[boundary - 1][1] if boundary else 0
    if last_prompt_char != prompt_end:
        raise UserError(f"prompt {prompt[-40:]!r}: its last characters and the answer's first ones form one token, "
                        "so prompt and answer cannot be split; end the prompt template with a space or a newline")
    return JoinedSplit(list(ids[:boundary]), list(ids[boundary:]), prompt[:last_prompt_char])


def generation_prompt(prompt: str) -> str:
    """The prompt as generation gives it to the model: without the trailing spaces the answer's first token holds."""
    return prompt.rstrip(" ")

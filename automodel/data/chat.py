"""Chat data: OpenAI-style `messages` rendered with the tokenizer's chat template, loss on assistant turns only.

When the template marks assistant text with `{% generation %}` ... `{% endgeneration %}`, transformers returns the
assistant mask. Otherwise the spans are found by rendering: the text of assistant turn k starts where
`messages[:k]` rendered with a generation prompt ends, and ends where `messages[:k+1]` rendered ends (less trailing
whitespace). Both renders must be prefixes of the whole conversation's text, which is checked; the labelled tokens
are those overlapping a span in the tokenization of the whole text, the same rule transformers uses for markers.
"""

from __future__ import annotations

import re
from typing import Any

from automodel.batch import IGNORE_INDEX
from automodel.data.sources import DROP_REASON, column_names, encode_parts, load_parts
from automodel.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def make_chat_dataset(
    tokenizer,
    dataset_name: str | list[str],
    split: str = "train",
    messages_column: str = "messages",
    tools_column: str | None = None,
    seq_length: int | None = None,
    train_on_prompt: bool = False,
    skip_invalid_rows: bool = False,
    limit_dataset_samples: int | None = None,
    streaming: bool = False,
    dataset_config: str | None = None,
    cache_dir: str | None = None,
):
    """Tokenized conversations as a `datasets.Dataset` (or `IterableDataset` when `streaming`) of
    `{"input_ids", "labels"}`; labels are -100 outside assistant turns (everywhere-on with `train_on_prompt`).

    The template is the tokenizer's: set `dataset.tokenizer.chat_template` (inline Jinja or a `.jinja` file) for
    a tokenizer that has none or to override it; the run saves the tokenizer, template included, with the model.
    A conversation without an assistant turn, or with a malformed message, is a one-line error naming the file and
    row, or is skipped and counted with `skip_invalid_rows: true`. Conversations longer than `seq_length` are
    dropped and counted.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template: set dataset.tokenizer.chat_template to a Jinja "
                        "template (inline or a .jinja file)")
    if seq_length is not None and (not isinstance(seq_length, int) or isinstance(seq_length, bool) or seq_length < 1):
        raise UserError(f"seq_length must be a positive integer or null, got {seq_length!r}")
    parts = load_parts(dataset_name, split, streaming, dataset_config, cache_dir)
    for part in parts:
        columns = column_names(part)
        for key, column in (("messages_column", messages_column), ("tools_column", tools_column)):
            if column is not None and column not in columns:
                raise UserError(f"{part.label}: no column '{column}' ({key}); it has: {', '.join(columns)}")
    encoder = ChatEncoder(tokenizer, messages_column, tools_column, seq_length, train_on_prompt, skip_invalid_rows)
    return encode_parts(parts, encoder, limit_dataset_samples, f"chat data {dataset_name}", seq_length)


def has_generation_markers(template: str) -> bool:
    return bool(GENERATION_MARKER.search(template))


class ChatEncoder:
    """A batched `datasets.map` function: conversations -> input_ids, labels, drop_reason (fingerprintable)."""

    def __init__(self, tokenizer, messages_column, tools_column, seq_length, train_on_prompt, skip_invalid_rows):
        self.tokenizer = tokenizer
        self.messages_column = messages_column
        self.tools_column = tools_column
        self.seq_length = seq_length
        self.train_on_prompt = train_on_prompt
        self.skip_invalid_rows = skip_invalid_rows
        self.use_markers = has_generation_markers(tokenizer.chat_template)

    def __call__(self, batch: dict[str, list], indices: list[int], label: str) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], DROP_REASON: []}
        for offset, index in enumerate(indices):
            tools = batch[self.tools_column][offset] if self.tools_column else None
            try:
                messages = clean_messages(batch[self.messages_column][offset])
                ids, mask = self.encode(messages, tools)
            except InvalidConversation as error:
                if not self.skip_invalid_rows:
                    raise UserError(f"{label}: row {index}: {error} (set skip_invalid_rows: true to skip "
                                    "such rows)") from None
                ids, mask, reason = [], [], f"row {index}: {error}"
            else:
                reason = "too long" if self.seq_length is not None and len(ids) > self.seq_length else ""
            out["input_ids"].append(ids)
            out["labels"].append([t if m or self.train_on_prompt else IGNORE_INDEX for t, m in zip(ids, mask)])
            out[DROP_REASON].append(reason)
        return out

    def encode(self, messages: list[dict], tools: Any) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and a 0/1 mask of the assistant tokens."""
        if self.use_markers:
            encoded = self.render(messages, tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        else:
            ids, mask = self.encode_by_prefixes(messages, tools)
        if not any(mask):
            raise InvalidConversation("the chat template rendered no assistant tokens")
        return ids, mask

    def encode_by_prefixes(self, messages: list[dict], tools: Any) -> tuple[list[int], list[int]]:
        text = self.render(messages, tools)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], tools, add_generation_prompt=True) if k else ""
            through = self.render(messages[:k + 1], tools)
            if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
                raise InvalidConversation(
                    f"the chat template does not render message {k}'s conversation prefix as a prefix of the whole "
                    "conversation, so assistant turns cannot be located; add {% generation %} markers to it")
            spans.append((len(before), len(through.rstrip())))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(end > a and start < b for a, b in spans)) for start, end in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), mask

    def render(self, messages: list[dict], tools: Any, **options):
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=options.pop("tokenize", False),
                                                      **options)
        except TemplateError as error:
            raise InvalidConversation(f"the chat template failed: {error}") from error


class InvalidConversation(ValueError):
    """A row that cannot be trained on; the encoder names its file and row."""


def clean_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages with keys that Arrow filled with None removed (a template tests `is defined`), checked."""
    if not isinstance(messages, list) or not messages:
        raise InvalidConversation("'messages' must be a non-empty list of {role, content} messages")
    cleaned = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidConversation(f"message {number} is not a mapping")
        message = {key: value for key, value in message.items() if value is not None}
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidConversation(f"message {number}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise InvalidConversation(f"message {number} ({role}) has no content")
        if content is not None and not isinstance(content, str):
            raise InvalidConversation(f"message {number} ({role}): content must be a string, "
                                      f"got {type(content).__name__}")
        cleaned.append(message)
    if not any(message["role"] == "assistant" for message in cleaned):
        raise InvalidConversation("the conversation has no assistant turn, so nothing to train on")
    return cleaned

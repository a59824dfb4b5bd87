"""Instruction data from any columns: `column_mapping` names which of the user's columns plays which role.

Prompt roles: `context`, `question`, `instruction`, `input`, `system`, `prompt`. Answer roles (exactly one):
`answer`, `output`, `completion`, `response`. Alpaca (`instruction`, `input`, `output`) needs no mapping at all;
Dolly / GSM8K style `{"prompt", "answer"}` neither. Each example is `prefix + prompt + answer + eos` where prefix
is what the tokenizer puts in front of a text (BOS for Llama); the loss covers the answer and EOS only unless
`train_on_prompt: true`. Prompt and answer are split where the tokenizer splits their joined text
(automodel/data/boundary.py).
"""

from __future__ import annotations

import string
from typing import Any

from automodel.batch import IGNORE_INDEX
from automodel.data.boundary import SPLIT_RULE, split_joined
from automodel.data.sources import DROP_REASON, column_names, encode_parts, load_parts
from automodel.data.tokenizer import special_token_affixes
from automodel.errors import UserError

PROMPT_ROLES = ("system", "instruction", "context", "input", "question", "prompt")
ANSWER_ROLES = ("answer", "output", "completion", "response")
# Headings of the default template; a role whose value is empty in a row is left out of that row's prompt.
HEADINGS = {"system": "System", "instruction": "Instruction", "context": "Context", "input": "Input",
            "question": "Question"}
RESPONSE_HEADING = "### Response:\n"


def make_instruction_dataset(
    tokenizer,
    dataset_name: str | list[str],
    split: str = "train",
    column_mapping: dict[str, str] | None = None,
    prompt_template: str | None = None,
    seq_length: int | None = None,
    train_on_prompt: bool = False,
    skip_invalid_rows: bool = False,
    limit_dataset_samples: int | None = None,
    streaming: bool = False,
    dataset_config: str | None = None,
    cache_dir: str | None = None,
):
    """Tokenized instruction data: a `datasets.Dataset` (or `IterableDataset` when `streaming`) of
    `{"input_ids", "labels"}` rows, labels aligned with input_ids (not shifted), -100 where no loss.

    `dataset_name`: hub id, local JSON/JSONL/parquet/CSV file, folder, glob, or a list of files.
    `column_mapping`: `{role: column}`; by default every column named like a role plays that role.
    `prompt_template`: a `str.format` template over the mapped prompt roles; by default one `### Role:` block per
    non-empty role (Alpaca's layout), or the bare `prompt` column. Examples longer than `seq_length` are dropped and
    counted. A bad row (missing or non-string field, empty answer) is a one-line error naming the file and row, or
    is skipped and counted with `skip_invalid_rows: true`.
    """
    for name, value in (("seq_length", seq_length), ("limit_dataset_samples", limit_dataset_samples)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{name} must be a positive integer or null, got {value!r}")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos token; targets end with eos so generation knows where to stop")
    parts = load_parts(dataset_name, split, streaming, dataset_config, cache_dir)
    mapping = resolve_mapping(column_mapping, column_names(parts[0]), parts[0].label)
    for part in parts[1:]:
        check_columns(mapping, column_names(part), part.label)
    encoder = InstructionEncoder(tokenizer, mapping, prompt_template, seq_length, train_on_prompt, skip_invalid_rows)
    return encode_parts(parts, encoder, limit_dataset_samples, f"instruction data {dataset_name}", seq_length)


def resolve_mapping(column_mapping: dict[str, str] | None, columns: list[str], label: str) -> dict[str, str]:
    if column_mapping is None:
        mapping = {column: column for column in columns if column in PROMPT_ROLES + ANSWER_ROLES}
    elif not isinstance(column_mapping, dict) or not all(isinstance(v, str) for v in column_mapping.values()):
        raise UserError(f"column_mapping: expected a mapping of role: column, got {column_mapping!r}")
    else:
        mapping = dict(column_mapping)
    for role in mapping:
        if role not in PROMPT_ROLES + ANSWER_ROLES:
            raise UserError(f"column_mapping.{role}: unknown role; roles are {', '.join(PROMPT_ROLES + ANSWER_ROLES)}")
    answers = [role for role in mapping if role in ANSWER_ROLES]
    if len(answers) != 1 or len(mapping) < 2:
        raise UserError(f"column_mapping: need one answer role ({'/'.join(ANSWER_ROLES)}) and at least one prompt "
                        f"role ({'/'.join(PROMPT_ROLES)}); got {mapping or 'nothing'} for columns {columns} of {label}")
    check_columns(mapping, columns, label)
    return mapping


def check_columns(mapping: dict[str, str], columns: list[str], label: str) -> None:
    for role, column in mapping.items():
        if column not in columns:
            raise UserError(f"{label}: no column '{column}' (column_mapping.{role}); it has: {', '.join(columns)}")


class InstructionEncoder:
    """A batched `datasets.map` function: rows -> input_ids, labels, drop_reason. A plain class (not a closure)
    so `datasets` can fingerprint it, tokenizer and settings included, for its cache."""

    def __init__(self, tokenizer, mapping, prompt_template, seq_length, train_on_prompt, skip_invalid_rows):
        self.tokenizer = tokenizer
        self.mapping = mapping
        self.answer_role = next(role for role in mapping if role in ANSWER_ROLES)
        self.prompt_roles = [role for role in PROMPT_ROLES if role in mapping]
        self.template = prompt_template
        if prompt_template is not None:
            check_template(prompt_template, self.prompt_roles)
        self.seq_length = seq_length
        self.train_on_prompt = train_on_prompt
        self.skip_invalid_rows = skip_invalid_rows
        self.prefix_ids = special_token_affixes(tokenizer)[0]
        self.split_rule = SPLIT_RULE  # in the fingerprint `datasets` caches the tokenized rows under

    def __call__(self, batch: dict[str, list], indices: list[int], label: str) -> dict[str, list]:
        prompts, answers, reasons = [], [], []
        for offset, index in enumerate(indices):
            row = {role: batch[column][offset] for role, column in self.mapping.items()}
            reason = self.invalid_reason(row)
            if reason and not self.skip_invalid_rows:
                raise UserError(f"{label}: row {index}: {reason} (set skip_invalid_rows: true to skip such rows)")
            prompts.append("" if reason else self.render(row))
            answers.append("" if reason else row[self.answer_role])
            reasons.append(f"row {index}: {reason}" if reason else "")
        out = {"input_ids": [], "labels": [], DROP_REASON: reasons}
        for index, split in enumerate(split_joined(self.tokenizer, prompts, answers)):
            prompt = self.prefix_ids + split.prompt_ids
            answer = split.answer_ids + [self.tokenizer.eos_token_id]
            if not reasons[index] and self.seq_length is not None and len(prompt) + len(answer) > self.seq_length:
                reasons[index] = "too long"
            out["input_ids"].append(prompt + answer)
            out["labels"].append((list(prompt) if self.train_on_prompt else [IGNORE_INDEX] * len(prompt)) + answer)
        return out

    def invalid_reason(self, row: dict[str, Any]) -> str:
        for role, value in row.items():
            column = self.mapping[role]
            if value is None:
                return f"no value in column '{column}' ({role})"
            if not isinstance(value, str):
                return f"column '{column}' ({role}) must be a string, got {type(value).__name__}"
        if not row[self.answer_role].strip():
            return f"empty answer in column '{self.mapping[self.answer_role]}'"
        return ""

    def render(self, row: dict[str, str]) -> str:
        if self.template is not None:
            return self.template.format(**{role: row[role] for role in self.prompt_roles})
        return default_prompt(row, self.prompt_roles)


def default_prompt(row: dict[str, str], roles: list[str]) -> str:
    if roles == ["prompt"]:
        return row["prompt"] + "\n"
    blocks = [row["prompt"] if role == "prompt" else f"### {HEADINGS[role]}:\n{row[role]}"
              for role in roles if row[role].strip()]
    return "\n\n".join(blocks) + "\n\n" + RESPONSE_HEADING


def check_template(template: str, roles: list[str]) -> None:
    if not isinstance(template, str):
        raise UserError(f"prompt_template: expected a string, got {template!r}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise UserError(f"prompt_template {template!r} is not a valid format string: {error}") from error
    unknown = sorted(field for field in fields if field not in roles)
    if unknown:
        raise UserError(f"prompt_template: field {{{unknown[0]}}} is not a mapped prompt role; "
                        f"mapped: {', '.join(roles)}")

"""SQuAD as a supervised fine-tuning dataset: prompt = context + question, target = the first answer.

Sources: a hub id (`rajpurkar/squad`), a local `.json` in the original nested SQuAD layout, a local
`.json`/`.jsonl` in the flattened hub layout (one row per question), or a folder holding one file per split.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from pathlib import Path
from typing import Any


from automodel.batch import IGNORE_INDEX
from automodel.data.dataset import (
    SFTDataset,
    looks_like_local_path,
    read_json_file,
    resolve_data_file,
)
from automodel.data.boundary import SPLIT_RULE, split_joined
from automodel.data.cache import cache_key, cached, default_cache_dir
from automodel.data.tokenizer import special_token_affixes
from automodel.errors import UserError
from automodel.logging.progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = "Context: {context} Question: {question} Answer: "
REQUIRED_FIELDS = ("context", "question", "answers")
# Longest word that truncation backs up over to avoid cutting it in half.
MAX_WORD_CHARS = 30
SQUAD_BUILDER = "automodel.data.squad.make_squad_dataset"
# How an over-long context is cut. Training: a window around the gold answer (the loss is on the answer, so it
# must stay readable). Held-out questions (validation, `automodel eval squad`): the context's start, decided
# without looking at the answers, which leave room for HELD_OUT_ANSWER_TOKENS (generation's default
# max_new_tokens); a question whose answer was cut away is counted, not hidden.
ANSWER_WINDOW, CONTEXT_START = "answer_window", "context_start"
TRUNCATIONS = (ANSWER_WINDOW, CONTEXT_START)
HELD_OUT_ANSWER_TOKENS = 32
# `spread_over_articles`: the fixed seed that orders each article's questions, so the selection is the same on
# every machine and run.
SPREAD_SEED = 0
# Tokenizing in chunks lets a progress bar show on large files.
PROGRESS_CHUNK = 2000
PROGRESS_MIN_TEXTS = 5000


def make_squad_dataset(
    tokenizer,
    dataset_name: str = "rajpurkar/squad",
    split: str = "train",
    seq_length: int | None = None,
    limit_dataset_samples: int | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    unanswerable_target: str = "unanswerable",
    answer_only_loss: bool = True,
    cache: bool = True,
    cache_dir: str | None = None,
    truncation: str = ANSWER_WINDOW,
    spread_over_articles: bool = False,
) -> SFTDataset:
    """Tokenized SQuAD: `input_ids = prompt + answer + eos`, labels aligned with input_ids (not shifted).

    `dataset_name` is a hub id, a local file (`split` is then unused) or a folder whose one file named
    after `split` is read. With `answer_only_loss` the prompt positions are labelled -100. Examples longer
    than `seq_length` have their context cut as `truncation` says: `answer_window` (training) keeps a window
    around the answer, and drops those that do not fit even with the answer's own span as context;
    `context_start` (held-out sets: the recipe's validation_dataset and `automodel eval squad` use nothing else)
    keeps the context's start, so that the prompt leaves HELD_OUT_ANSWER_TOKENS free, without looking at the
    answers, and marks `answer_cut` the questions none of whose answers is left in it. SQuAD v2 rows (`is_impossible`, or no answer) get
    `unanswerable_target`. `dataset.examples[i]` describes item i: `id, title, context, question, answers`
    (all answer texts), `target`, `prompt` (the exact string tokenized, so generation can reuse it) and
    `truncated`, `answer_cut`; `context` is the possibly shortened one that is in the prompt and `answer_start` is where
    the target is in it (None when it is not: unanswerable rows, answers not found in the context).
    `limit_dataset_samples` takes the source's first questions, which come from one or two articles; with
    `spread_over_articles` it takes them from every article in turn (round robin over the articles, in file order;
    within an article, in an order shuffled with the fixed SPREAD_SEED), the same questions on every run.
    Local files are tokenized once and cached (`cache_dir`, default ~/.cache/automodel or $AUTOMODEL_CACHE).
    """
    check_positive("seq_length", seq_length)
    check_positive("limit_dataset_samples", limit_dataset_samples)
    check_template(prompt_template)
    if not isinstance(spread_over_articles, bool):
        raise UserError(f"spread_over_articles must be true or false, got {spread_over_articles!r}")
    if truncation not in TRUNCATIONS:
        raise UserError(f"truncation: expected one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos token; SQuAD targets end with eos so generation knows where to stop")
    settings = dict(seq_length=seq_length, template=prompt_template, unanswerable=unanswerable_target,
                    answer_only_loss=answer_only_loss, truncation=truncation)
    cache_settings = dict(settings, split=split, limit=limit_dataset_samples, split_rule=SPLIT_RULE,
                          spread=spread_over_articles)

    def build() -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
        examples = load_examples(dataset_name, split, limit_dataset_samples, spread_over_articles)
        return tokenize_squad(tokenizer, examples, **settings)

    if cache and looks_like_local_path(dataset_name):
        key = cache_key(resolve_data_file(dataset_name, split), tokenizer, cache_settings, __file__)
        items, meta = cached("squad", key, Path(cache_dir) if cache_dir else default_cache_dir(), build)
    else:
        items, meta = build()
    kept_examples = meta["examples"]
    num_truncated = sum(ex["truncated"] for ex in kept_examples)
    logger.info(
        "SQuAD %s (%s): %d examples%s, %d truncated and %d dropped to fit seq_length=%s",
        dataset_name, split, len(items),
        f" from {len({ex['title'] for ex in kept_examples})} articles" if spread_over_articles else "",
        num_truncated, meta["num_dropped"], seq_length,
    )
    if truncation == CONTEXT_START and num_truncated:
        logger.info("SQuAD %s (%s): held out, so a context is cut at its end, without looking at the answers: "
                    "%d questions have every answer cut out of theirs", dataset_name, split,
                    count_answer_cut(kept_examples))
    return SFTDataset(items, kept_examples, num_dropped=meta["num_dropped"], num_truncated=num_truncated)


def tokenize_squad(tokenizer, examples: list[dict[str, Any]], seq_length: int | None, template: str,
                   unanswerable: str, answer_only_loss: bool,
                   truncation: str = ANSWER_WINDOW) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Items, and as meta the examples they came from and how many were dropped (see make_squad_dataset)."""
    eos_id = tokenizer.eos_token_id
    for example in examples:
        example["target"] = example["answers"][0] if example["answers"] else unanswerable
        example["prompt"] = render(template, example["context"], example["question"])
        example["truncated"] = example["answer_cut"] = False

    keep = [True] * len(examples)
    if seq_length is not None:
        # Contexts are shortened on separately tokenized lengths (a window needs the prompt's length alone);
        # the joined split below is then checked against seq_length again.
        prompt_ids = batch_token_ids(tokenizer, [ex["prompt"] for ex in examples], add_special_tokens=True,
                                     progress=True)
        answer_ids = [ids + [eos_id] for ids in batch_token_ids(tokenizer, [ex["target"] for ex in examples], False)]
        keep = fit_to_length(tokenizer, template, examples, prompt_ids, answer_ids, seq_length, truncation)
    kept = [example for example, fits in zip(examples, keep) if fits]
    prefix = special_token_affixes(tokenizer)[0]
    splits = split_joined(tokenizer, [ex["prompt"] for ex in kept], [ex["target"] for ex in kept],
                          progress=len(kept) >= PROGRESS_MIN_TEXTS)

    items, kept_examples = [], []
    for example, split in zip(kept, splits):
        prompt, answer = prefix + split.prompt_ids, split.answer_ids + [eos_id]
        if seq_length is not None and len(prompt) + len(answer) > seq_length:
            continue
        example["prompt"] = split.prompt_text  # what generation gives the model: no trailing space
        prompt_labels = [IGNORE_INDEX] * len(prompt) if answer_only_loss else list(prompt)
        items.append({"input_ids": prompt + answer, "labels": prompt_labels + answer})
        kept_examples.append(example)
    return items, {"examples": kept_examples, "num_dropped": len(examples) - len(items)}


def count_answer_cut(examples: list[dict[str, Any]]) -> int:
    """Questions with answers none of which is left in the (cut) context the model sees."""
    return sum(bool(example.get("answer_cut")) for example in examples)


def held_out_settings(node: dict[str, Any], key: str) -> dict[str, Any]:
    """A SQuAD builder section of a held-out set, cut without looking at the answers (`context_start`)."""
    if node.get("_target_") != SQUAD_BUILDER:
        return node
    if node.get("truncation", CONTEXT_START) != CONTEXT_START:
        raise UserError(f"{key}.truncation: {node['truncation']!r} picks the context a held-out question shows by "
                        f"its gold answer, which the model must not be told; use {CONTEXT_START} (the default)")
    return {**node, "truncation": CONTEXT_START}


def check_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UserError(f"{name} must be a positive integer or null, got {value!r}")


def check_template(template: str) -> None:
    try:
        render(template, "", "")
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(
            f"prompt_template {template!r} cannot be filled ({error!r}); it may only use {{context}} and {{question}}"
        ) from error


def render(template: str, context: str, question: str) -> str:
    return template.format(context=context, question=question)


def batch_token_ids(tokenizer, texts: list[str], add_special_tokens: bool, progress: bool = False) -> list[list[int]]:
    """Token ids of `texts`; with `add_special_tokens`, only what the tokenizer puts in front (BOS), never an EOS
    that `add_eos` would append: the prompt is followed by the answer."""
    if not texts:
        return []
    prefix = special_token_affixes(tokenizer)[0] if add_special_tokens else []
    ids = []
    # Only the ids: converting attention masks to Python lists costs about as much again as the encoding.
    wanted = progress and len(texts) >= PROGRESS_MIN_TEXTS
    with progress_bar(len(texts), "tokenizing", wanted, unit="texts") as bar:
        for start in range(0, len(texts), PROGRESS_CHUNK):
            chunk = texts[start:start + PROGRESS_CHUNK]
            encoded = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                                return_token_type_ids=False)
            ids.extend(prefix + row for row in encoded["input_ids"])
            bar.update(len(chunk))
    return ids


# ---------------------------------------------------------------- loading


def load_examples(dataset_name: str, split: str, limit: int | None,
                  spread: bool = False) -> list[dict[str, Any]]:
    """The first `limit` questions of the source (with `spread`, of its articles in turn, see make_squad_dataset)
    as `{id, title, context, question, answers}` dicts."""
    if looks_like_local_path(dataset_name):
        path = resolve_data_file(dataset_name, split)
        rows = read_local_rows(path)
        source = str(path)
    else:
        rows = read_hub_rows(dataset_name, split, None if spread else limit)
        source = f"{dataset_name} (split {split})"
    numbered = list(enumerate(rows))  # file positions, for the errors
    if spread:
        numbered = spread_over_articles(numbered)
    if limit is not None:
        numbered = numbered[:limit]
    return [normalize_row(row, index, source) for index, row in numbered]


def spread_over_articles(numbered: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """`(position, row)` pairs reordered to take one question of each article in turn (articles in file order, by
    `title`; rows without one count as one article), each article's questions shuffled with SPREAD_SEED."""
    articles: dict[Any, list[tuple[int, Any]]] = {}
    for position, row in numbered:
        title = str(row.get("title", "")) if isinstance(row, dict) else ""
        articles.setdefault(title, []).append((position, row))
    rng = random.Random(SPREAD_SEED)
    for questions in articles.values():
        rng.shuffle(questions)
    turns = itertools.zip_longest(*articles.values())
    return [pair for turn in turns for pair in turn if pair is not None]


def read_local_rows(path: Path) -> list[dict[str, Any]]:
    data = read_json_file(path)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        # The original SQuAD layout wraps articles in {"data": [...]}; some exports wrap flat rows the same way.
        articles = data["data"]
        if articles and isinstance(articles[0], dict) and "paragraphs" in articles[0]:
            return flatten_nested(articles, path)
        data = articles
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UserError(
            f"{path} is neither SQuAD's nested layout ({{'data': [{{'paragraphs': ...}}]}}) nor a list of question rows"
        )
    return data


def flatten_nested(articles: list[Any], path: Path) -> list[dict[str, Any]]:
    """One row per question, in file order, from SQuAD's article -> paragraph -> question nesting."""
    rows = []
    for article_index, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise UserError(f"{path}: article {article_index} has no 'paragraphs' list")
        for paragraph_index, paragraph in enumerate(paragraphs):
            questions = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(questions, list):
                raise UserError(f"{path}: article {article_index} paragraph {paragraph_index} has no 'qas' list")
            for question in questions:
                row = {"title": article.get("title", "")}
                if "context" in paragraph:  # a missing context is reported per question by normalize_row
                    row["context"] = paragraph["context"]
                row.update(question if isinstance(question, dict) else {})
                rows.append(row)
    return rows


def read_hub_rows(dataset_name: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        dataset = datasets.load_dataset(dataset_name, split=split)
    except (ConnectionError, DatasetNotFoundError) as error:
        raise UserError(
            f"cannot load dataset '{dataset_name}' (split {split}) from the Hugging Face hub: the machine looks "
            f"offline or the id is wrong ({type(error).__name__}); point dataset_name at a local .json/.jsonl file "
            "or folder instead"
        ) from error
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list()


def normalize_row(row: dict[str, Any], index: int, source: str) -> dict[str, Any]:
    where = f"{source}: row {index}" + (f" (id {row['id']})" if "id" in row else "")
    for field in REQUIRED_FIELDS:
        if field not in row:
            raise UserError(f"{where} has no '{field}' field")
    for field in ("context", "question"):
        if not isinstance(row[field], str):
            raise UserError(f"{where}: '{field}' must be a string, got {type(row[field]).__name__}")
    answers, starts = answer_texts(row["answers"], where)
    if row.get("is_impossible", False):
        answers = starts = []  # SQuAD v2 keeps "plausible" spans for impossible questions; none of them is the answer
    return {
        "id": str(row.get("id", index)),
        "title": row.get("title", ""),
        "context": row["context"],
        "question": row["question"],
        "answers": answers,
        "answer_start": locate_answer(row["context"], answers[0], starts[0] if starts else None) if answers else None,
    }


def answer_texts(answers: Any, where: str) -> tuple[list[str], list[Any]]:
    """Answer strings and starts from either layout: `[{"text", "answer_start"}]` or `{"text": [...], ...}`."""
    if isinstance(answers, dict) and isinstance(answers.get("text"), list):
        texts, starts = answers["text"], answers.get("answer_start") or []
    elif isinstance(answers, list) and all(isinstance(answer, dict) and "text" in answer for answer in answers):
        texts, starts = [answer["text"] for answer in answers], [answer.get("answer_start") for answer in answers]
    else:
        raise UserError(f"{where}: 'answers' must be a list of {{'text', 'answer_start'}} or {{'text': [...]}}")
    if not all(isinstance(text, str) for text in texts):
        raise UserError(f"{where}: every answer text must be a string")
    return texts, starts


def locate_answer(context: str, answer: str, start: Any) -> int | None:
    """Where `answer` is in `context`: the given `answer_start` when it is right, else the first match."""
    if isinstance(start, int) and not isinstance(start, bool) and context[start:start + len(answer)] == answer:
        return start
    found = context.find(answer) if answer else -1
    return found if found >= 0 else None


# ---------------------------------------------------------------- truncation


def fit_to_length(tokenizer, template, examples, prompt_ids, answer_ids, seq_length,
                  truncation: str = ANSWER_WINDOW) -> list[bool]:
    """Shorten the context of over-long examples in place; returns which examples fit `seq_length`.

    Only the context is cut (at word boundaries, so the prompt stays plain text that generation will see
    too): the question and the answer are what the example is about. `answer_window`: a window around the
    answer, which must stay readable in the prompt; an example whose question, answer and the answer's own
    span in the context do not fit is dropped, and rows without an answer span in the context (unanswerable
    ones) keep the start of their context. `context_start`: every prompt longer than seq_length -
    HELD_OUT_ANSWER_TOKENS keeps the start of its context, whatever the answers are (see make_squad_dataset).
    """
    held_out = truncation == CONTEXT_START
    budgets = {i: seq_length - (HELD_OUT_ANSWER_TOKENS if held_out else len(answer_ids[i]))
               for i in range(len(examples))}
    too_long = [i for i in range(len(examples)) if len(prompt_ids[i]) > budgets[i]]
    keep = [True] * len(examples)
    spans = {i: (0, 0) if held_out else answer_span(examples[i]) for i in too_long}
    smallest = [render(template, examples[i]["context"][slice(*spans[i])].strip(), examples[i]["question"])
                for i in too_long]
    smallest_lengths = dict(zip(too_long, map(len, batch_token_ids(tokenizer, smallest, add_special_tokens=True))))
    pending = []
    for i in too_long:
        if smallest_lengths[i] > budgets[i]:
            keep[i] = False
        else:
            pending.append(i)
    windows = {i: (0, len(examples[i]["context"])) for i in pending}
    lengths = {i: len(prompt_ids[i]) for i in pending}
    # Token counts do not map exactly onto characters, so cut by an estimate and re-measure. Every round
    # shrinks each pending window and the answer span alone is known to fit, so the loop ends.
    while pending:
        for i in pending:
            windows[i] = shrink_window(examples[i]["context"], windows[i], spans[i], lengths[i] - budgets[i],
                                       lengths[i] - smallest_lengths[i])
        prompts = [render(template, examples[i]["context"][slice(*windows[i])].strip(), examples[i]["question"])
                   for i in pending]
        still_long = []
        for i, prompt, ids in zip(pending, prompts, batch_token_ids(tokenizer, prompts, add_special_tokens=True)):
            lengths[i] = len(ids)
            if lengths[i] > budgets[i]:
                still_long.append(i)
            else:
                apply_window(examples[i], windows[i], prompt)
                prompt_ids[i] = ids
        pending = still_long
    return keep


def answer_span(example: dict[str, Any]) -> tuple[int, int]:
    """Character span of the target in the context; empty at the start when the context does not hold it."""
    start = example["answer_start"]
    if start is None:
        return 0, 0
    return start, start + len(example["target"])


def apply_window(example: dict[str, Any], window: tuple[int, int], prompt: str) -> None:
    text = example["context"][slice(*window)]
    stripped = text.strip()
    offset = window[0] + len(text) - len(text.lstrip())
    if example["answer_start"] is not None:
        example["answer_start"] -= offset
        if not 0 <= example["answer_start"] <= len(stripped) - len(example["target"]):
            example["answer_start"] = None  # the target's span is no longer in the context
    answers = example["answers"]
    example.update(context=stripped, prompt=prompt, truncated=True,
                   answer_cut=bool(answers) and not any(answer in stripped for answer in answers))


def shrink_window(context: str, window: tuple[int, int], span: tuple[int, int], excess_tokens: int,
                  removable_tokens: int) -> tuple[int, int]:
    """`window` without roughly `excess_tokens` tokens' worth of characters, taken from whichever side has more
    room, never cutting into `span`, snapped to word boundaries; always strictly smaller."""
    start, end = window
    left_room, right_room = span[0] - start, end - span[1]
    chars_per_token = (left_room + right_room) / max(removable_tokens, 1)
    remove = min(left_room + right_room, max(1, math.ceil(excess_tokens * chars_per_token)))
    from_left = min(left_room, max(remove // 2, remove - right_room))
    from_right = min(right_room, remove - from_left)
    # Snapping only moves the ends further in, so the window still shrinks.
    return snap_start(context, start + from_left, span[0]), snap_end(context, end - from_right, span[1])


def snap_start(context: str, start: int, limit: int) -> int:
    """Move `start` forward to the next word start (not past `limit`), unless no space is near (e.g. Chinese)."""
    if start == 0 or context[start - 1].isspace():
        return start
    space = context.find(" ", start, min(limit, start + MAX_WORD_CHARS))
    return space + 1 if space >= 0 else start


def snap_end(context: str, end: int, limit: int) -> int:
    """Move `end` back to the end of the previous whole word (not before `limit`)."""
    if end == len(context) or context[end].isspace():
        return end
    space = context.rfind(" ", max(limit, end - MAX_WORD_CHARS), end)
    return space if space >= 0 else end

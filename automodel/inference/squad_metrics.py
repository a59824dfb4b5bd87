"""SQuAD exact match and F1, as the official evaluation scripts compute them.

v1.1 (`evaluate-v1.1.py`): lower-case, strip punctuation, drop the articles a/an/the, collapse white space;
score = max over the gold answers; totals are percentages. v2.0 (`evaluate-v2.0.py`) adds unanswerable
questions: their gold is the empty string, an empty prediction is the "no answer" prediction, and F1
with an empty side is 1 when both are empty, else 0; scores are also split into HasAns / NoAns.
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, articles and extra white space (the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version: str = "1.1") -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if version == "2.0" and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)  # "no answer" is right only against "no answer"
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: list[str], version: str) -> list[str]:
    """The answers scored against: v2.0 drops answers that normalise to nothing; no answer at all is ['']."""
    if version == "2.0":
        answers = [a for a in answers if normalize_answer(a)]
        return answers or [""]
    return answers


def score_one(prediction: str, answers: list[str], version: str = "1.1") -> tuple[float, float]:
    """(exact match, F1) of one prediction: the best over the gold answers, each in [0, 1]."""
    golds = gold_answers(answers, version)
    if not golds:
        raise ValueError("a SQuAD v1.1 question needs at least one gold answer")
    return (max(exact_match(prediction, g) for g in golds), max(f1(prediction, g, version) for g in golds))


def squad_scores(predictions: dict[str, str], answers: dict[str, list[str]], version: str = "1.1") -> dict:
    """Official-style totals over `answers`' questions: `exact_match`, `f1` (percent), `total`, and for v2.0
    the HasAns_/NoAns_ breakdown. A question without a prediction counts as wrong (the official script warns)."""
    if version not in ("1.1", "2.0"):
        raise ValueError(f"SQuAD version must be '1.1' or '2.0', got {version!r}")
    per_question = {qid: score_one(predictions.get(qid, ""), golds, version) for qid, golds in answers.items()}
    scores = _totals(per_question.values(), "")
    if version == "2.0":
        has_answer = {qid for qid, golds in answers.items() if any(normalize_answer(a) for a in golds)}
        scores |= _totals([s for q, s in per_question.items() if q in has_answer], "HasAns_")
        scores |= _totals([s for q, s in per_question.items() if q not in has_answer], "NoAns_")
    scores["missing_predictions"] = sum(qid not in predictions for qid in answers)
    return scores


def _totals(per_question, prefix: str) -> dict:
    values = list(per_question)
    count = len(values)
    exact = 100.0 * sum(e for e, _ in values) / count if count else 0.0
    f1_total = 100.0 * sum(f for _, f in values) / count if count else 0.0
    return {f"{prefix}exact_match": exact, f"{prefix}f1": f1_total, f"{prefix}total": count}

"""The SQuAD scorer on hand-checked cases: normalisation, max over gold answers, v2.0 no-answer handling."""

from __future__ import annotations

import pytest

from automodel.inference.squad_metrics import f1, normalize_answer, score_one, squad_scores


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   apple, a pear!  ", "apple pear"),
    ("Denver Broncos.", "denver broncos"),
    ("theater", "theater"),            # 'the' only as a whole word
    ("U.S.", "us"),                    # punctuation removed inside words too
    ("rock-n-roll", "rocknroll"),
    ("A", ""),
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_needs_normalisation():
    # Differ only in case, article, punctuation and spacing: exact match after normalisation.
    assert score_one("the  Denver Broncos!", ["Denver Broncos"]) == (1.0, 1.0)
    assert score_one("Broncos", ["Denver Broncos"])[0] == 0.0


def test_f1_by_hand():
    # prediction tokens: denver broncos won (3); gold: denver broncos (2); common 2.
    # precision 2/3, recall 2/2 -> F1 = 2 * (2/3 * 1) / (2/3 + 1) = 0.8
    assert f1("Denver Broncos won", "the Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count once per occurrence: pred "x y y" vs gold "y z": common {y: 1} -> p 1/3, r 1/2, F1 0.4
    assert f1("x y y", "y z") == pytest.approx(0.4)
    assert f1("nothing alike", "Denver") == 0.0


def test_max_over_gold_answers():
    em, f1_score = score_one("Santa Clara", ["Levi's Stadium", "Santa Clara, California", "Santa Clara"])
    assert em == 1.0 and f1_score == 1.0
    em, f1_score = score_one("California", ["Levi's Stadium", "Santa Clara, California"])
    assert em == 0.0 and f1_score == pytest.approx(0.5)  # p 1/1, r 1/3 -> 0.5


def test_totals_are_percentages_and_missing_predictions_count_as_wrong():
    answers = {"q1": ["Denver Broncos"], "q2": ["1990"], "q3": ["Paris"]}
    scores = squad_scores({"q1": "the Denver Broncos", "q2": "in 1990"}, answers)
    assert scores["total"] == 3 and scores["missing_predictions"] == 1
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)  # "in 1990" vs "1990": p 1/2, r 1 -> 2/3


def test_v2_no_answer_handling():
    answers = {"has": ["Paris"], "none": [], "none2": []}
    # An empty prediction is right exactly for unanswerable questions.
    scores = squad_scores({"has": "Paris", "none": "", "none2": "London"}, answers, version="2.0")
    assert scores["HasAns_total"] == 1 and scores["NoAns_total"] == 2
    assert scores["HasAns_exact_match"] == 100.0
    assert scores["NoAns_exact_match"] == 50.0 and scores["NoAns_f1"] == 50.0
    assert scores["exact_match"] == pytest.approx(200 / 3)
    # Empty prediction on an answerable question: 0 in v2.0 (and in v1.1).
    assert score_one("", ["Paris"], "2.0") == (0.0, 0.0)
    # v2.0 drops gold answers that normalise to nothing: "The" alone means no answer.
    assert score_one("", ["The"], "2.0") == (1.0, 1.0)


def test_v1_requires_gold_answers():
    with pytest.raises(ValueError):
        score_one("x", [], "1.1")

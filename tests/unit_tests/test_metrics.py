"""agents.metrics on hand-made cases, every number checked exactly (POPE parsing, scores, short answers,
changes), including the edge cases: no positives, all yes, empty."""

from __future__ import annotations

import pytest

from agents.metrics import (
    PopeScores,
    answer_scores,
    change_counts,
    exact_match,
    first_sentence,
    group_indices,
    is_correct,
    normalize_short_answer,
    normalized_match,
    pope_label,
    pope_scores,
    scored_form,
    yes_no_reference,
)
from api_tool.errors import InvalidParameterError


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("Yes", "yes"),
        ("yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("No, there is not.", "no"),
        ("There is not a dog.", "no"),
        ("Yes. There is no cat, though.", "yes"),  # only the first sentence counts
        ("There is a dog. No cat.", "yes"),
        ("no,", "no"),  # commas are dropped before splitting
        ("Nope", "yes"),  # LLaVA's rule knows only No / no / not
        ("NO", "yes"),
        ("nothing here", "yes"),  # whole words only
        ("No\nthere is none", "no"),  # any whitespace separates words
        ("", "yes"),  # an empty answer is a yes, as in LLaVA's script
    ],
)
def test_pope_label_follows_llavas_first_sentence_rule(answer: str, label: str) -> None:
    assert pope_label(answer) == label


def test_first_sentence() -> None:
    assert first_sentence("Yes. No.") == "Yes"
    assert first_sentence("no period") == "no period"
    assert first_sentence(".") == ""


def test_pope_scores_on_a_hand_made_confusion() -> None:
    answers = ["Yes", "No, it is not.", "no", "Yes, it is.", "yes", "There is not."]
    references = ["yes", "yes", "no", "no", "Yes", "NO"]
    scores = pope_scores(answers, references)
    # tp: 0, 4; fn: 1; tn: 2, 5; fp: 3
    assert (scores.n, scores.tp, scores.fp, scores.tn, scores.fn) == (6, 2, 1, 2, 1)
    assert scores.accuracy == 4 / 6
    assert scores.precision == 2 / 3
    assert scores.recall == 2 / 3
    assert scores.f1 == pytest.approx(2 / 3, abs=0, rel=1e-15)
    assert scores.yes_ratio == 3 / 6


def test_f1_is_the_harmonic_mean_of_precision_and_recall() -> None:
    scores = pope_scores(["yes", "yes", "yes", "no", "no"], ["yes", "no", "no", "yes", "no"])
    assert (scores.tp, scores.fp, scores.fn, scores.tn) == (1, 2, 1, 1)
    assert scores.precision == 1 / 3 and scores.recall == 1 / 2
    harmonic = 2 * scores.precision * scores.recall / (scores.precision + scores.recall)
    assert scores.f1 == pytest.approx(harmonic, rel=1e-15)
    assert scores.f1 == 2 / 5


def test_all_yes_answers() -> None:
    scores = pope_scores(["yes"] * 4, ["yes", "no", "no", "no"])
    assert (scores.tp, scores.fp, scores.tn, scores.fn) == (1, 3, 0, 0)
    assert scores.yes_ratio == 1.0
    assert scores.precision == 0.25 and scores.recall == 1.0 and scores.accuracy == 0.25
    assert scores.f1 == 2 / 5


def test_no_yes_answers_leaves_precision_undefined() -> None:
    scores = pope_scores(["no", "no", "no"], ["yes", "no", "yes"])
    assert scores.precision is None
    assert scores.recall == 0.0 and scores.f1 == 0.0
    assert scores.accuracy == 1 / 3 and scores.yes_ratio == 0.0


def test_no_positive_references() -> None:
    all_right = pope_scores(["no", "No."], ["no", "no"])
    assert all_right.recall is None and all_right.precision is None and all_right.f1 is None
    assert all_right.accuracy == 1.0 and all_right.yes_ratio == 0.0
    one_false_yes = pope_scores(["no", "yes"], ["no", "no"])
    assert one_false_yes.recall is None
    assert one_false_yes.precision == 0.0 and one_false_yes.f1 == 0.0


def test_empty_input() -> None:
    assert pope_scores([], []) == PopeScores(0, 0, 0, 0, 0, None, None, None, None, None)
    empty = answer_scores([], [])
    assert empty.n == 0 and empty.accuracy is None and empty.exact_accuracy is None
    counts = change_counts([], [], [])
    assert counts.n == 0 and counts.change_rate is None and counts.net_gain == 0


def test_pope_scores_reject_bad_input() -> None:
    with pytest.raises(InvalidParameterError, match="reference 1 is 'maybe'"):
        pope_scores(["yes", "no"], ["yes", "maybe"])
    with pytest.raises(InvalidParameterError, match="2 answers but 1 references"):
        pope_scores(["yes", "no"], ["yes"])


def test_pope_scores_as_dict_is_json_ready() -> None:
    assert pope_scores(["yes"], ["yes"]).as_dict() == {
        "n": 1,
        "tp": 1,
        "fp": 0,
        "tn": 0,
        "fn": 0,
        "accuracy": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "yes_ratio": 1.0,
    }


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("Red", "red"),
        ("  The red circle. ", "red circle"),
        ("An orange star!", "orange star"),
        ("Two", "2"),
        ("there are three circles", "there are 3 circles"),
        ("twenty", "20"),
        ("3.", "3"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("left, of", "left of"),
        ("don't", "don t"),
        ("theatre", "theatre"),  # articles only as whole words
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_short_answer(answer: str, normalized: str) -> None:
    assert normalize_short_answer(answer) == normalized


def test_exact_and_normalized_match() -> None:
    assert exact_match("Red ", "red") and not exact_match("red.", "red")
    assert normalized_match("red.", "red") and normalized_match("2", "two") and normalized_match("the 2", "Two")
    assert not normalized_match("red circle", "red")


def test_yes_no_reference() -> None:
    assert [yes_no_reference(r) for r in ("Yes", " no. ", "yes, it is", "red", "")] == ["yes", "no", None, None, None]


def test_is_correct_scores_yes_no_the_pope_way_and_the_rest_by_normalised_match() -> None:
    assert is_correct("Yes, there is a red circle.", "yes")
    assert not is_correct("Yes, there is a red circle.", "no")
    assert is_correct("There is not.", "No")
    assert is_correct("Two.", "2")
    assert not is_correct("2 circles", "2")
    assert scored_form("No, it is not.", "yes") == "no"
    assert scored_form("The Circle!", "circle") == "circle"


def test_answer_scores_count_each_match_kind() -> None:
    scores = answer_scores(["Red.", "two", "yes, it is", "blue", "No"], ["red", "2", "yes", "green", "no"])
    assert (scores.n, scores.correct, scores.exact, scores.normalized) == (5, 4, 1, 3)
    assert scores.accuracy == 4 / 5 and scores.exact_accuracy == 1 / 5 and scores.normalized_accuracy == 3 / 5


def test_change_counts_transitions() -> None:
    first = ["yes", "no", "red", "blue", "No.", "yes, there is"]
    second = ["No, none.", "no", "Blue", "green", "no", "Yes."]
    references = ["no", "yes", "red", "red", "no", "yes"]
    counts = change_counts(first, second, references)
    # 0: wrong -> right (changed); 1: wrong -> wrong (same); 2: right -> wrong (changed);
    # 3: wrong -> wrong (changed: blue -> green); 4: right -> right (same label); 5: right -> right (same label)
    assert (counts.n, counts.changed) == (6, 3)
    assert (counts.right_to_wrong, counts.wrong_to_right, counts.right_to_right, counts.wrong_to_wrong) == (1, 1, 2, 2)
    assert counts.change_rate == 0.5 and counts.net_gain == 0
    assert counts.as_dict()["net_gain"] == 0


def test_change_counts_reject_mismatched_lengths() -> None:
    with pytest.raises(InvalidParameterError, match="2 first answers, 1 second answers and 2 references"):
        change_counts(["a", "b"], ["a"], ["a", "b"])


def test_group_indices_keeps_first_appearance_order() -> None:
    assert group_indices(["b", "a", "b", None]) == {"b": [0, 2], "a": [1], None: [3]}
    assert group_indices([]) == {}

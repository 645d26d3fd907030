"""Scoring of evaluation answers and the statistics of a study: pure functions, no models, no files.

* POPE (as LLaVA's ``eval_pope.py`` scores it): keep the answer's first sentence, drop commas, split into
  words; the words ``No``, ``no`` or ``not`` mean "no", anything else means "yes" (an empty answer is a
  "yes", as there). "yes" is the positive class; :func:`pope_scores` gives accuracy, precision, recall,
  F1 and the share of "yes" answers. The one deviation from LLaVA's script: words are split on any
  whitespace, not only on single spaces, so ``"No\\n..."`` reads as "no".
* Short answers: :func:`normalize_short_answer` (lower case, punctuation and articles removed, number
  words as digits) and the two matches built on it, :func:`exact_match` and :func:`normalized_match`.
* One rule for "is this answer right": :func:`is_correct` scores a yes/no reference the POPE way and any
  other reference by normalised match; :func:`scored_form` is what that rule compares, so two answers
  "differ" (:func:`change_counts`) only when the score could see the difference.
* Study statistics (numpy, vectorised): :func:`bootstrap_interval` (a mean, e.g. accuracy, with its
  percentile bootstrap interval, seeded), :func:`paired_difference_interval` (two modes on the same items,
  items resampled together), :func:`mcnemar_test` (exact, two-sided, on the discordant pairs),
  :func:`final_line_share` and :func:`tool_call_rates`, and how a map covers ground-truth regions
  (:func:`mask_mass_shares`, :func:`region_enrichment`, :func:`region_peaks`).

Undefined ratios (precision with no "yes" answers, recall with no "yes" references, anything on zero
items) are ``None``, never a made-up 0 or 1.

Example:
    >>> pope_label("No, there is no dog. But a cat."), pope_label("There is a dog.")
    ('no', 'yes')
    >>> scores = pope_scores(["yes", "No.", "yes"], ["yes", "no", "no"])
    >>> scores.accuracy, scores.precision, scores.recall, scores.yes_ratio
    (0.6666666666666666, 0.5, 1.0, 0.6666666666666666)
    >>> normalize_short_answer("Two red circles."), is_correct("The answer is 2", "two")
    ('2 red circles', False)
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from api_tool.errors import InvalidParameterError

YesNo = Literal["yes", "no"]

NEGATIVE_WORDS: frozenset[str] = frozenset({"No", "no", "not"})
"""The words that make a POPE answer a "no" (LLaVA's rule, case-sensitive: ``NO`` is not among them)."""

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
_NUMBERS_TO_TWENTY = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
)
NUMBER_WORDS: dict[str, str] = {word: str(value) for value, word in enumerate(_NUMBERS_TO_TWENTY.split(" "))}

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PUNCTUATION = re.compile(r"[^\w\s.]")
_STRAY_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")


def first_sentence(answer: str) -> str:
    """The text before the first period (the whole text when there is none), as LLaVA's POPE script.

    Example:
        >>> first_sentence("Yes. There is no dog."), first_sentence("no")
        ('Yes', 'no')
    """
    return answer.split(".", 1)[0]


def pope_label(answer: str) -> YesNo:
    """``"no"`` when the first sentence holds the word ``No``, ``no`` or ``not`` (commas dropped), else ``"yes"``.

    Example:
        >>> [pope_label(a) for a in ("Yes, it is.", "no", "There is not.", "Nope", "Yes. No other.", "")]
        ['yes', 'no', 'no', 'yes', 'yes', 'yes']
    """
    words = first_sentence(answer).replace(",", "").split()
    return "no" if NEGATIVE_WORDS.intersection(words) else "yes"


def yes_no_reference(reference: str) -> YesNo | None:
    """``"yes"`` or ``"no"`` when the reference answer is one of them (any case, surrounding punctuation
    ignored), else ``None``.

    Example:
        >>> yes_no_reference(" Yes. "), yes_no_reference("no"), yes_no_reference("red")
        ('yes', 'no', None)
    """
    word = normalize_short_answer(reference)
    return word if word in ("yes", "no") else None  # type: ignore[return-value]


def normalize_short_answer(answer: str) -> str:
    """Lower case; commas inside numbers and other punctuation removed (a period stays only between
    digits); the articles a, an, the dropped; number words zero..twenty written as digits; single spaces.

    Example:
        >>> normalize_short_answer("  The Two RED circles! "), normalize_short_answer("3.5 kg, or 1,000 g.")
        ('2 red circles', '3.5 kg or 1000 g')
    """
    text = _DIGIT_COMMA.sub("", answer.casefold())
    text = _STRAY_PERIOD.sub(" ", _PUNCTUATION.sub(" ", text))
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def exact_match(answer: str, reference: str) -> bool:
    """The answer is the reference, ignoring case and surrounding whitespace only.

    Example:
        >>> exact_match(" Red", "red"), exact_match("red.", "red")
        (True, False)
    """
    return answer.strip().casefold() == reference.strip().casefold()


def normalized_match(answer: str, reference: str) -> bool:
    """The answer equals the reference after :func:`normalize_short_answer` on both.

    Example:
        >>> normalized_match("Two.", "2"), normalized_match("a red circle", "red circle"), normalized_match("3", "2")
        (True, True, False)
    """
    return normalize_short_answer(answer) == normalize_short_answer(reference)


def scored_form(answer: str, reference: str) -> str:
    """What :func:`is_correct` compares: the POPE label for a yes/no reference, else the normalised answer.

    Example:
        >>> scored_form("No, it is not.", "yes"), scored_form("The Circle", "circle")
        ('no', 'circle')
    """
    if yes_no_reference(reference) is not None:
        return pope_label(answer)
    return normalize_short_answer(answer)


def is_correct(answer: str, reference: str) -> bool:
    """A yes/no reference is matched by the answer's POPE label; any other by normalised match.

    Example:
        >>> is_correct("Yes, there is a red circle.", "yes"), is_correct("Blue.", "blue"), is_correct("", "no")
        (True, True, False)
    """
    expected = yes_no_reference(reference)
    if expected is not None:
        return pope_label(answer) == expected
    return normalized_match(answer, reference)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


@dataclass(frozen=True)
class PopeScores:
    """POPE's numbers on one set of yes/no questions ("yes" is the positive class).

    Attributes:
        n: number of questions; tp, fp, tn, fn: the confusion counts.
        accuracy: (tp + tn) / n.
        precision: tp / (tp + fp); ``None`` when no answer is "yes".
        recall: tp / (tp + fn); ``None`` when no reference is "yes".
        f1: 2 tp / (2 tp + fp + fn) (the harmonic mean of precision and recall, 0 when either is 0);
            ``None`` when neither answers nor references hold a "yes".
        yes_ratio: share of "yes" answers.
    """

    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    yes_ratio: float | None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def pope_scores(answers: Sequence[str], references: Sequence[str]) -> PopeScores:
    """Score free-form ``answers`` against yes/no ``references`` the POPE way.

    Raises ``InvalidParameterError`` when the lengths differ or a reference is not yes/no.

    Example:
        >>> pope_scores(["Yes", "no", "Yes", "No"], ["yes", "yes", "no", "no"]).f1
        0.5
        >>> pope_scores([], []).accuracy is None
        True
    """
    if len(answers) != len(references):
        raise InvalidParameterError(f"got {len(answers)} answers but {len(references)} references")
    expected: list[YesNo] = []
    for index, reference in enumerate(references):
        label = yes_no_reference(reference)
        if label is None:
            raise InvalidParameterError(f"POPE references must be 'yes' or 'no'; reference {index} is {reference!r}")
        expected.append(label)
    predicted = [pope_label(answer) for answer in answers]
    tp = sum(p == "yes" and e == "yes" for p, e in zip(predicted, expected))
    fp = sum(p == "yes" and e == "no" for p, e in zip(predicted, expected))
    tn = sum(p == "no" and e == "no" for p, e in zip(predicted, expected))
    fn = sum(p == "no" and e == "yes" for p, e in zip(predicted, expected))
    n = len(expected)
    return PopeScores(
        n=n,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=_ratio(tp + tn, n),
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, tp + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        yes_ratio=_ratio(tp + fp, n),
    )


@dataclass(frozen=True)
class AnswerScores:
    """Accuracy of free-form answers on any references.

    Attributes:
        n: number of answers.
        correct: how many :func:`is_correct` accepts; accuracy: correct / n.
        exact: how many :func:`exact_match` accepts; exact_accuracy: exact / n.
        normalized: how many :func:`normalized_match` accepts; normalized_accuracy: normalized / n.
    """

    n: int
    correct: int
    accuracy: float | None
    exact: int
    exact_accuracy: float | None
    normalized: int
    normalized_accuracy: float | None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def answer_scores(answers: Sequence[str], references: Sequence[str]) -> AnswerScores:
    """Correct / exact / normalised accuracy of ``answers`` against ``references``.

    Example:
        >>> scores = answer_scores(["Red.", "two", "yes, it is"], ["red", "2", "yes"])
        >>> scores.correct, scores.exact, scores.normalized
        (3, 0, 2)
    """
    if len(answers) != len(references):
        raise InvalidParameterError(f"got {len(answers)} answers but {len(references)} references")
    n = len(answers)
    correct = sum(is_correct(a, r) for a, r in zip(answers, references))
    exact = sum(exact_match(a, r) for a, r in zip(answers, references))
    normalized = sum(normalized_match(a, r) for a, r in zip(answers, references))
    return AnswerScores(
        n=n,
        correct=correct,
        accuracy=_ratio(correct, n),
        exact=exact,
        exact_accuracy=_ratio(exact, n),
        normalized=normalized,
        normalized_accuracy=_ratio(normalized, n),
    )


@dataclass(frozen=True)
class ChangeCounts:
    """How a second answer relates to a first one (reflection, or any mode against the plain answer).

    Attributes:
        n: number of questions.
        changed: how many second answers differ from the first in :func:`scored_form`.
        change_rate: changed / n.
        right_to_wrong, wrong_to_right: changes that lost / fixed a correct answer.
        right_to_right, wrong_to_wrong: both answers right / both wrong (a wrong answer may change into
            another wrong one).
    """

    n: int
    changed: int
    change_rate: float | None
    right_to_wrong: int
    wrong_to_right: int
    right_to_right: int
    wrong_to_wrong: int

    @property
    def net_gain(self) -> int:
        """wrong_to_right - right_to_wrong: how many more questions the second answers get right."""
        return self.wrong_to_right - self.right_to_wrong

    def as_dict(self) -> dict[str, Any]:
        """The fields (and ``net_gain``) as a JSON-ready dict."""
        return {**asdict(self), "net_gain": self.net_gain}


def change_counts(first: Sequence[str], second: Sequence[str], references: Sequence[str]) -> ChangeCounts:
    """Compare two answers per question: how often the scored answer changed, and right/wrong transitions.

    Example:
        >>> counts = change_counts(["yes", "no", "red"], ["No.", "no", "Blue"], ["no", "yes", "red"])
        >>> counts.changed, counts.wrong_to_right, counts.right_to_wrong, counts.wrong_to_wrong
        (2, 1, 1, 1)
    """
    if not len(first) == len(second) == len(references):
        raise InvalidParameterError(
            f"got {len(first)} first answers, {len(second)} second answers and {len(references)} references"
        )
    changed = sum(scored_form(a, r) != scored_form(b, r) for a, b, r in zip(first, second, references))
    before = [is_correct(a, r) for a, r in zip(first, references)]
    after = [is_correct(b, r) for b, r in zip(second, references)]
    return ChangeCounts(
        n=len(references),
        changed=changed,
        change_rate=_ratio(changed, len(references)),
        right_to_wrong=sum(x and not y for x, y in zip(before, after)),
        wrong_to_right=sum(y and not x for x, y in zip(before, after)),
        right_to_right=sum(x and y for x, y in zip(before, after)),
        wrong_to_wrong=sum(not x and not y for x, y in zip(before, after)),
    )


def group_indices(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices of equal keys, groups in order of first appearance.

    Example:
        >>> group_indices(["random", "popular", "random"])
        {'random': [0, 2], 'popular': [1]}
    """
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return groups


# ----------------------------------------------------------------------------------------------
# Standard benchmarks' own metrics (``agents.benchmarks`` groups the records for them).
# ----------------------------------------------------------------------------------------------

_VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_VQA_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_NUMBERS = {"none": "0", **{word: NUMBER_WORDS[word] for word in _NUMBERS_TO_TWENTY.split(" ")[:11]}}
_VQA_CONTRACTED: tuple[str, ...] = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "I'd've", "I'm", "I've",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've",
    "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd've", "should've", "shouldn't", "shouldn't've",
    "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've", "weren't",
    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've",
    "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


def _apostrophe_variants(word: str) -> set[str]:
    """``word`` with each non-empty subset of its apostrophes left out (``couldn't've`` -> ``couldntve``...)."""
    places = [i for i, char in enumerate(word) if char == "'"]
    variants = set()
    for mask in range(1, 2 ** len(places)):
        dropped = {places[k] for k in range(len(places)) if mask >> k & 1}
        variants.add("".join(char for i, char in enumerate(word) if i not in dropped))
    return variants


VQA_CONTRACTIONS: dict[str, str] = {
    variant: word for word in _VQA_CONTRACTED for variant in _apostrophe_variants(word) if variant != word
}
"""Contractions written without (some of) their apostrophes, mapped to the standard spelling (EvalAI's table)."""


def vqa_normalize(answer: str) -> str:
    """The VQA / EvalAI answer normalisation (as TextVQA's and VQAv2's official evaluators apply it): lower
    case; commas and question marks dropped, ``'s`` split off; other punctuation removed (or made a space
    when it joins two words); periods dropped unless in a number; number words zero..ten (and ``none``) as
    digits; articles dropped; contractions given their apostrophes.

    Example:
        >>> vqa_normalize("The Two dogs!"), vqa_normalize("Coca-Cola"), vqa_normalize("dont"), vqa_normalize("3.5")
        ('2 dogs', 'coca cola', "don't", '3.5')
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    joined = _VQA_DIGIT_COMMA.search(text) is not None
    for mark in _VQA_PUNCTUATION:
        gap = "" if (mark + " " in text or " " + mark in text or joined) else " "
        text = text.replace(mark, gap)
    text = _VQA_PERIOD.sub("", text)
    words = [_VQA_NUMBERS.get(word, word) for word in text.split()]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """The standard VQA accuracy of one answer against the human answers (10 in TextVQA / VQAv2): for each
    human answer left out in turn, ``min(1, matches among the others / 3)``, averaged; answers compared after
    :func:`vqa_normalize`.

    Example:
        >>> vqa_accuracy("Stop", ["stop"] * 10), vqa_accuracy("stop", ["stop"] * 2 + ["go"] * 8)
        (1.0, 0.6)
    """
    if not human_answers:
        raise InvalidParameterError("VQA accuracy needs at least one human answer")
    wanted = vqa_normalize(answer)
    humans = [vqa_normalize(human) for human in human_answers]
    matches = sum(human == wanted for human in humans)
    scores = [min(1.0, (matches - (human == wanted)) / 3) for human in humans]
    return sum(scores) / len(scores)


MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)


def mme_label(answer: str) -> Literal["yes", "no", "other"]:
    """MME's reading of an answer (its ``eval_tool/calculation.py``): the lower-cased answer if it is ``yes``
    or ``no``, else ``yes``/``no`` when found in its first four characters, else ``other`` (always wrong).

    Example:
        >>> mme_label("Yes"), mme_label("No, it is not."), mme_label("There is a dog.")
        ('yes', 'no', 'other')
    """
    text = answer.lower()
    if text in ("yes", "no"):
        return text  # type: ignore[return-value]
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(rows: Sequence[tuple[str, str, str, str]]) -> dict[str, Any]:
    """MME's scores from ``(subtask, image key, answer, reference yes/no)`` rows: per subtask the accuracy
    over questions, ``acc+`` (images with both questions right) and the score ``100 * (acc + acc+)`` (at
    most 200); ``perception`` and ``cognition`` sum the scores of the subtasks present of each kind.

    Example:
        >>> rows = [("color", "1", "Yes", "yes"), ("color", "1", "No", "no"), ("color", "2", "yes", "no"),
        ...         ("color", "2", "no", "yes")]
        >>> scores = mme_scores(rows)["subtasks"]["color"]
        >>> scores["accuracy"], scores["accuracy_plus"], scores["score"]
        (0.5, 0.5, 100.0)
    """
    by_task: dict[str, dict[str, list[bool]]] = {}
    for task, image, answer, reference in rows:
        right = mme_label(answer) == reference.strip().lower()
        by_task.setdefault(task, {}).setdefault(image, []).append(right)
    subtasks = {}
    for task, images in by_task.items():
        answers = [right for rights in images.values() for right in rights]
        accuracy = sum(answers) / len(answers)
        plus = sum(all(rights) for rights in images.values()) / len(images)
        subtasks[task] = {
            "questions": len(answers),
            "images": len(images),
            "accuracy": accuracy,
            "accuracy_plus": plus,
            "score": 100 * (accuracy + plus),
        }
    return {
        "subtasks": subtasks,
        "perception": sum(s["score"] for t, s in subtasks.items() if t in MME_PERCEPTION),
        "cognition": sum(s["score"] for t, s in subtasks.items() if t in MME_COGNITION),
    }


def hallusion_scores(rows: Sequence[tuple[str, str, str, str, str, bool]]) -> dict[str, Any]:
    """HallusionBench's three accuracies from ``(category, subcategory, set_id, figure_id, question_id,
    correct)`` rows: ``aAcc`` over questions, ``fAcc`` over figures (every question about the figure
    right) and ``qAcc`` over questions asked of several figures (right on every figure).

    Example:
        >>> rows = [("VD", "illusion", "0", "0", "0", True), ("VD", "illusion", "0", "0", "1", False),
        ...         ("VD", "illusion", "0", "1", "0", True), ("VD", "illusion", "0", "1", "1", True)]
        >>> scores = hallusion_scores(rows)
        >>> scores["aAcc"], scores["fAcc"], scores["qAcc"]
        (0.75, 0.5, 0.5)
    """
    figures: dict[tuple[str, ...], list[bool]] = {}
    questions: dict[tuple[str, ...], list[bool]] = {}
    for category, subcategory, set_id, figure_id, question_id, correct in rows:
        figures.setdefault((category, subcategory, set_id, figure_id), []).append(correct)
        questions.setdefault((category, subcategory, set_id, question_id), []).append(correct)
    return {
        "questions": len(rows),
        "aAcc": _ratio(sum(correct for *_, correct in rows), len(rows)),
        "fAcc": _ratio(sum(all(group) for group in figures.values()), len(figures)),
        "qAcc": _ratio(sum(all(group) for group in questions.values()), len(questions)),
    }


_CHOICE = re.compile(r"^\s*\(?([A-Z])\)?(?:[\s.:,)]|$)")


def choice_of(answer: str, options: Sequence[str]) -> str | None:
    """The option letter an answer picks: a leading ``B``, ``(B)``, ``B.`` or ``B)``, else the letter of the
    option whose text the answer is (after :func:`normalize_short_answer`), else ``None``.

    Example:
        >>> options = ["red", "blue", "green", "white"]
        >>> choice_of("(B) blue", options), choice_of("Green.", options), choice_of("I am not sure", options)
        ('B', 'C', None)
    """
    letters = [chr(ord("A") + index) for index in range(len(options))]
    found = _CHOICE.match(answer)
    if found and found.group(1) in letters:
        return found.group(1)
    wanted = normalize_short_answer(answer)
    for letter, option in zip(letters, options):
        if normalize_short_answer(option) == wanted:
            return letter
    return None


# ----------------------------------------------------------------------------------------------
# Study statistics: paired bootstrap intervals, McNemar's exact test, shares, map coverage.
# ----------------------------------------------------------------------------------------------

BOOTSTRAP_RESAMPLES = 10_000
"""Resamples of the percentile bootstrap unless told otherwise."""
BOOTSTRAP_SEED = 0
"""The seed of the bootstrap's generator unless told otherwise (intervals are reproducible)."""
_BOOTSTRAP_CHUNK = 1_000
"""Resamples drawn per block, so memory stays at ``_BOOTSTRAP_CHUNK * n`` indices whatever the count."""


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval.

    Attributes:
        estimate: the statistic on the items themselves (a mean, or a difference of means).
        low, high: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled statistic.
        level: the coverage asked for (0.95).
        n: items resampled; resamples: how many resamples; seed: the generator's seed.
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int
    resamples: int
    seed: int

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside ``[low, high]`` (a difference "significant" at this level)."""
        return self.low > 0.0 or self.high < 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields (and ``excludes_zero``) as a JSON-ready dict."""
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def _as_scores(values: Sequence[float] | NDArray[np.generic], name: str) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise InvalidParameterError(f"{name} must be one score per item (1-D), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InvalidParameterError(f"{name} holds a NaN or infinite score")
    return array


def bootstrap_indices(n: int, resamples: int, seed: int) -> Iterator[NDArray[np.intp]]:
    """The item indices of each resample, ``(rows, n)`` blocks of at most 1,000 rows, from
    ``numpy.random.default_rng(seed)``: the same seed gives the same resamples, so two statistics
    bootstrapped with one seed are resampled on the same items (paired).

    Example:
        >>> blocks = list(bootstrap_indices(4, 3, seed=0))
        >>> [block.shape for block in blocks]
        [(3, 4)]
    """
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        yield rng.integers(0, n, size=(min(_BOOTSTRAP_CHUNK, resamples - start), n))


def _check_bootstrap(n: int, resamples: int, level: float) -> None:
    if n < 1:
        raise InvalidParameterError("a bootstrap interval needs at least one item")
    if resamples < 1:
        raise InvalidParameterError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise InvalidParameterError(f"level must be in (0, 1), got {level}")


def bootstrap_means(
    values: Sequence[float] | NDArray[np.generic],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> NDArray[np.float64]:
    """The mean of ``values`` on each of ``resamples`` resamples of the items (with replacement).

    Example:
        >>> bootstrap_means([1.0, 1.0, 1.0], resamples=4).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    scores = _as_scores(values, "values")
    _check_bootstrap(len(scores), resamples, 0.5)
    return np.concatenate([scores[block].mean(axis=1) for block in bootstrap_indices(len(scores), resamples, seed)])


def bootstrap_interval(
    values: Sequence[float] | NDArray[np.generic],
    *,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """The mean of per-item scores (1/0 correctness gives accuracy) with its percentile bootstrap interval.

    Raises ``InvalidParameterError`` on no items, a score that is not finite, or a level outside (0, 1).

    Example:
        >>> interval = bootstrap_interval([1, 0, 1, 1] * 25)
        >>> interval.estimate, interval.low < 0.75 < interval.high
        (0.75, True)
        >>> bootstrap_interval([1, 1, 1]).low
        1.0
    """
    scores = _as_scores(values, "values")
    _check_bootstrap(len(scores), resamples, level)
    means = bootstrap_means(scores, resamples=resamples, seed=seed)
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(float(scores.mean()), float(low), float(high), level, len(scores), resamples, seed)


def paired_difference_interval(
    first: Sequence[float] | NDArray[np.generic],
    second: Sequence[float] | NDArray[np.generic],
    *,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """``mean(second - first)`` over the same items (the difference of the two means), with a paired
    percentile bootstrap interval: each resample draws items (not answers), so both modes' scores of an
    item stay together.

    Raises ``InvalidParameterError`` when the two hold different numbers of items.

    Example:
        >>> interval = paired_difference_interval([0, 1, 0, 1] * 25, [1, 1, 0, 1] * 25)
        >>> interval.estimate, interval.excludes_zero
        (0.25, True)
        >>> paired_difference_interval([1, 0, 1], [1, 0, 1]).as_dict()["high"]
        0.0
    """
    before = _as_scores(first, "first")
    after = _as_scores(second, "second")
    if len(before) != len(after):
        raise InvalidParameterError(f"paired scores need the same items: got {len(before)} and {len(after)}")
    return bootstrap_interval(after - before, level=level, resamples=resamples, seed=seed)


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's exact test on paired right/wrong outcomes of two modes.

    Attributes:
        n: paired items.
        b: items the first mode got right and the second wrong (right -> wrong).
        c: items the first mode got wrong and the second right (wrong -> right).
        p_value: the two-sided exact binomial p-value of ``min(b, c)`` among ``b + c`` discordant pairs
            under p = 1/2 (1.0 when there are none).
    """

    n: int
    b: int
    c: int
    p_value: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``min(1, 2 * P(X <= min(b, c)))`` for X ~ Binomial(b + c, 1/2),
    in exact integer arithmetic.

    Example:
        >>> round(mcnemar_exact_p(10, 2), 4), mcnemar_exact_p(3, 3), mcnemar_exact_p(0, 0)
        (0.0386, 1.0, 1.0)
    """
    if b < 0 or c < 0:
        raise InvalidParameterError(f"discordant counts must be non-negative, got b={b}, c={c}")
    total = b + c
    tail = sum(math.comb(total, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**total)


def mcnemar_test(first_correct: Sequence[bool], second_correct: Sequence[bool]) -> McNemarResult:
    """McNemar's exact test on two modes' correctness over the same items (see :class:`McNemarResult`).

    Example:
        >>> result = mcnemar_test([True] * 10 + [False] * 2, [False] * 10 + [True] * 2)
        >>> result.b, result.c, round(result.p_value, 4)
        (10, 2, 0.0386)
    """
    if len(first_correct) != len(second_correct):
        raise InvalidParameterError(
            f"paired outcomes need the same items: got {len(first_correct)} and {len(second_correct)}"
        )
    b = sum(bool(x) and not bool(y) for x, y in zip(first_correct, second_correct))
    c = sum(bool(y) and not bool(x) for x, y in zip(first_correct, second_correct))
    return McNemarResult(n=len(first_correct), b=b, c=c, p_value=mcnemar_exact_p(b, c))


@dataclass(frozen=True)
class Share:
    """How many of ``n`` items have a property.

    Attributes:
        n: items; count: items with the property; rate: count / n (``None`` on no items).
    """

    n: int
    count: int
    rate: float | None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def share(flags: Sequence[bool]) -> Share:
    """The share of true flags.

    Example:
        >>> share([True, False, True, True]).rate, share([]).rate
        (0.75, None)
    """
    count = sum(bool(flag) for flag in flags)
    return Share(n=len(flags), count=count, rate=_ratio(count, len(flags)))


def final_line_share(replies: Sequence[str]) -> Share:
    """The share of replies with a parsable ``FINAL: <answer>`` line (``agents.prompts.parse_final_answer``).

    Example:
        >>> final_line_share(["I see it.\\nFINAL: red", "red", "FINAL:"]).count
        1
    """
    from agents.prompts import parse_final_answer

    return share([parse_final_answer(reply) is not None for reply in replies])


def tool_call_rates(tool_calls: Sequence[int], groups: Sequence[Hashable]) -> dict[Hashable, Share]:
    """Per group, the share of conversations with at least one tool call (``tool_calls``: calls per
    conversation), groups in order of first appearance.

    Example:
        >>> rates = tool_call_rates([1, 0, 2, 0], ["detail", "whole", "detail", "whole"])
        >>> rates["detail"].rate, rates["whole"].rate
        (1.0, 0.0)
    """
    if len(tool_calls) != len(groups):
        raise InvalidParameterError(f"got {len(tool_calls)} call counts but {len(groups)} groups")
    return {group: share([tool_calls[i] > 0 for i in indices]) for group, indices in group_indices(groups).items()}


def mask_mass_shares(weights: NDArray[np.floating], masks: NDArray[np.bool_]) -> NDArray[np.float64]:
    """The share of a map's total mass inside each of ``masks``: ``weights`` ``(H, W)`` non-negative,
    ``masks`` ``(K, H, W)`` boolean; returns ``(K,)`` (zeros when the map has no mass).

    Example:
        >>> weights = np.array([[3.0, 1.0], [0.0, 0.0]])
        >>> mask_mass_shares(weights, np.array([[[True, False], [False, False]]])).tolist()
        [0.75]
    """
    grid = np.asarray(weights, dtype=np.float64)
    regions = np.asarray(masks, dtype=bool)
    if regions.ndim != 3 or regions.shape[1:] != grid.shape:
        raise InvalidParameterError(f"masks must be (K, {grid.shape[0]}, {grid.shape[1]}), got {regions.shape}")
    if (grid < 0).any():
        raise InvalidParameterError("map weights must be non-negative")
    total = grid.sum()
    inside = np.einsum("khw,hw->k", regions.astype(np.float64), grid)
    return inside / total if total > 0 else np.zeros(len(regions))


def region_enrichment(weights: NDArray[np.floating], masks: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Per mask, its share of the map's mass divided by its share of the pixels: 1 for a uniform map,
    above 1 where the map concentrates (``(K,)``; 0 for an empty mask).

    Example:
        >>> weights = np.array([[3.0, 1.0], [0.0, 0.0]])
        >>> region_enrichment(weights, np.array([[[True, False], [False, False]]])).tolist()
        [3.0]
    """
    regions = np.asarray(masks, dtype=bool)
    mass = mask_mass_shares(weights, regions)
    area = regions.reshape(len(regions), -1).mean(axis=1)
    return np.divide(mass, area, out=np.zeros_like(mass), where=area > 0)


def region_peaks(weights: NDArray[np.floating], masks: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Per mask, the map's largest value inside it divided by the map's largest value anywhere (``(K,)``
    in [0, 1]; 1 where the global peak lies; 0 for an empty mask or a map without mass).

    Example:
        >>> weights = np.array([[4.0, 1.0], [2.0, 0.0]])
        >>> region_peaks(weights, np.array([[[False, True], [True, False]]])).tolist()
        [0.5]
    """
    grid = np.asarray(weights, dtype=np.float64)
    regions = np.asarray(masks, dtype=bool)
    mask_mass_shares(grid, regions)  # the same shape and sign checks
    top = grid.max(initial=0.0)
    inside = np.where(regions, grid[None], -np.inf).reshape(len(regions), -1).max(axis=1, initial=-np.inf)
    return np.where(np.isfinite(inside) & (top > 0), inside / top if top > 0 else 0.0, 0.0)

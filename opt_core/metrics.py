"""Evaluation metrics, framework-free: perplexity, accuracy and macro F1, SQuAD exact match and F1.

Written here rather than taken from HF's `evaluate` library, which downloads its metric scripts. The SQuAD scores
follow the official v1.1 evaluation script (the normalisation, the token-level F1, the best over the gold answers,
reported in percent as that script and HF's `squad` metric report them); a question without gold answers (SQuAD
v2's unanswerable ones) is scored as the v2 script scores it: 1 when the prediction is empty too, else 0.
`opt_core.data.evaluate` turns a model's outputs into these numbers; the training loops of the three frameworks
(`opt_torch`, `opt_tf`, `opt_flax`) call it, so all three report the same figures.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np

from opt_core.errors import InputError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def perplexity(mean_loss: float) -> float:
    """exp of the mean per-token cross-entropy (nats); inf where that overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of predictions equal to their label (0..1)."""
    predictions, labels = _paired(predictions, labels)
    return float(np.mean(predictions == labels))


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """The unweighted mean over classes of each class's F1 (0..1), as scikit-learn's `f1_score(average="macro")`:
    the classes are those seen in the labels or the predictions, and a class with no true positive scores 0."""
    predictions, labels = _paired(predictions, labels)
    scores = []
    for cls in np.union1d(predictions, labels):
        true_positive = np.sum((predictions == cls) & (labels == cls))
        predicted, actual = np.sum(predictions == cls), np.sum(labels == cls)
        scores.append(0.0 if true_positive == 0 else 2 * true_positive / (predicted + actual))
    return float(np.mean(scores))


def _paired(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if len(predictions) != len(labels) or len(labels) == 0:
        raise InputError(f"{len(predictions)} predictions for {len(labels)} labels: give one per label (at least one)")
    return predictions, labels


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """The F1 of the normalised strings' word multisets (0..1); 0 when they share no word (v1.1's rule)."""
    predicted, actual = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(predicted) & collections.Counter(actual)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(actual)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD's {"exact_match", "f1"} in percent: per question the best score over its gold answers, then the mean.

    Args:
        predictions: question id -> predicted answer text.
        references: question id -> its gold answer texts (empty for an unanswerable question).
    """
    missing = [key for key in references if key not in predictions]
    if missing or not references:
        raise InputError(f"no prediction for {len(missing)} of {len(references)} questions, e.g. {missing[:3]}")
    exact, f1 = 0.0, 0.0
    for key, golds in references.items():
        if not golds:  # unanswerable (SQuAD v2): right only when the prediction is empty too, as v2's script
            exact += float(not normalize_answer(predictions[key]))
            f1 += float(not normalize_answer(predictions[key]))
            continue
        exact += max(squad_exact_match(predictions[key], gold) for gold in golds)
        f1 += max(squad_f1(predictions[key], gold) for gold in golds)
    return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * f1 / len(references)}

"""Evaluation metrics of fine-tuned models: accuracy (micro, macro over subjects), calibration,
ROUGE / BLEU of generated text (:func:`generation_scores`) and the SQuAD-style answer F1
(:func:`token_f1`).

Example::

    >>> accuracy_report(["A", "B", "C"], ["A", "B", "D"], ["x", "x", "y"])
    {'micro': 0.6666666666666666, 'macro': 0.5, 'subjects': {'x': 1.0, 'y': 0.0}}
    >>> probs = [[0.9, 0.1], [0.3, 0.7]]
    >>> round(expected_calibration_error(probs, [0, 0], n_bins=10), 6)
    0.4
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adaptlab.training.optim import TrainingError


def accuracy_report(
    pred: Sequence[Hashable], gold: Sequence[Hashable], subjects: Sequence[str] | None = None
) -> dict[str, Any]:
    """Micro accuracy, per-subject accuracy and their mean (macro, landscape.md §4).

    Args:
        pred: ``[N]`` predicted labels (letters, ids, ...).
        gold: ``[N]`` gold labels, same kind.
        subjects: ``[N]`` subject of each example, or ``None`` (then macro = micro).

    Returns:
        ``{"micro": float, "macro": float, "subjects": {subject: accuracy}}``, subjects sorted.

    Raises:
        TrainingError: empty input or lengths that differ.
    """
    lengths = {len(pred), len(gold)} | ({len(subjects)} if subjects is not None else set())
    if len(lengths) != 1:
        raise TrainingError(
            f"pred ({len(pred)}), gold ({len(gold)}) and subjects "
            f"({'-' if subjects is None else len(subjects)}) must have one entry per example."
        )
    if not len(pred):
        raise TrainingError("No predictions to score; the evaluation set is empty.")
    correct = np.array([p == g for p, g in zip(pred, gold, strict=True)], dtype=np.float64)
    micro = float(correct.mean())
    if subjects is None:
        return {"micro": micro, "macro": micro, "subjects": {}}
    names = np.asarray(subjects)
    per_subject = {str(s): float(correct[names == s].mean()) for s in sorted(set(subjects))}
    return {
        "micro": micro,
        "macro": float(np.mean(list(per_subject.values()))),
        "subjects": per_subject,
    }


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins, for ECE and reliability diagrams.

    Bin b covers (edges[b], edges[b + 1]]; the first also holds confidence 0.

    Attributes:
        edges: ``[n_bins + 1]`` bin edges from 0 to 1.
        confidence: ``[n_bins]`` mean max-probability in each bin (NaN when empty).
        accuracy: ``[n_bins]`` fraction of correct argmax predictions (NaN when empty).
        count: ``[n_bins]`` examples in each bin.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def reliability_bins(probs: Any, labels: Any, n_bins: int = 10) -> ReliabilityBins:
    """Bin examples by confidence (max probability) and measure accuracy in each bin.

    Args:
        probs: ``[N, C]`` class probabilities (softmax over the label logits), array or tensor.
        labels: ``[N]`` gold class indices.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        The bins.

    Raises:
        TrainingError: bad shapes, empty input or ``n_bins`` < 1.
    """
    probs = _as_float64(probs)
    labels = _as_float64(labels).astype(np.int64)
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or not len(labels):
        raise TrainingError(
            f"probs {list(probs.shape)} and labels {list(labels.shape)} do not match; expected "
            "[N, C] and [N] with N > 0."
        )
    if n_bins < 1:
        raise TrainingError(f"n_bins={n_bins} must be at least 1 (10 is usual).")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=n_bins) / count
        mean_acc = np.bincount(which, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges, mean_conf, mean_acc, count)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over equal-width confidence bins (graft.md).

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` gold class indices.
        n_bins: number of bins.

    Returns:
        ECE in [0, 1].
    """
    bins = reliability_bins(probs, labels, n_bins)
    full = bins.count > 0
    gaps = np.abs(bins.accuracy[full] - bins.confidence[full])
    return float(np.sum(bins.count[full] / bins.count.sum() * gaps))


def prediction_records(logits: Any, labels: Sequence[int]) -> list[dict[str, Any]]:
    """One JSON-ready record per evaluated example, in input order: what a study compares
    example by example (agreement of two methods, correlation of their logits).

    Args:
        logits: ``[M, C]`` class scores, exactly those accuracy and ECE were computed from.
        labels: ``[M]`` gold class indices.

    Returns:
        ``[M]`` dicts ``{"index": i, "label": y, "logits": [C floats], "prediction": argmax}``;
        ties go to the first class, as ``torch.argmax`` counts them for accuracy.
    """
    scores = torch.as_tensor(logits, dtype=torch.float64)
    if scores.ndim != 2 or len(scores) != len(labels):
        raise TrainingError(
            f"prediction_records got logits of shape {tuple(scores.shape)} and {len(labels)} "
            "labels; pass [M, C] scores and one label per example."
        )
    predictions = scores.argmax(1).tolist()
    return [
        {"index": i, "label": int(label), "logits": row, "prediction": prediction}
        for i, (label, row, prediction) in enumerate(
            zip(labels, scores.tolist(), predictions, strict=True)
        )
    ]


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


Reference = str | Sequence[str]
"""One example's reference text, or all of its references (WebNLG's lexicalisations)."""
ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(text: str) -> list[str]:
    """SQuAD / CoQA answer normalisation: lower case, punctuation and the articles a, an, the
    removed, split on whitespace.

    >>> normalize_answer("The Cat's  hat!")
    ['cats', 'hat']
    """
    text = "".join(char for char in text.lower() if char not in string.punctuation)
    return [word for word in text.split() if word not in ARTICLES]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 of two answers after :func:`normalize_answer`: the harmonic mean
    of precision and recall of the common tokens (counted with multiplicity); 1.0 when both
    normalise to nothing, 0.0 when only one does.

    >>> round(token_f1("the big red dog", "a red dog barked"), 4)
    0.6667
    """
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_scores(
    predictions: Sequence[str], references: Sequence[Reference], answer_f1: bool = False
) -> dict[str, float]:
    """ROUGE-1/2/L and corpus BLEU of generated texts against one or several references each.

    ROUGE is the F-measure of ``rouge-score`` (lower case, Porter stemming of words longer than
    3 letters), averaged over examples, in [0, 1]; ``rougeL`` is the sentence-level LCS. With
    several references an example takes its best reference (``score_multi``).
    BLEU is ``sacrebleu``'s corpus BLEU (13a tokenisation, exponential smoothing), in [0, 100];
    several references per example become several reference streams (``None`` where an example
    has fewer references than the most any has), as multi-reference BLEU counts them.

    Args:
        predictions: ``[N]`` generated texts.
        references: ``[N]`` reference texts, or ``[N]`` lists of references, same order.
        answer_f1: also give ``token_f1``, the mean over examples of the best
            :func:`token_f1` against the example's references (CoQA's and SQuAD's F1), in [0, 1].

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "bleu"}`` (and ``"token_f1"``).

    Raises:
        TrainingError: empty input, lengths that differ, or an example without references.

    >>> scores = generation_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    >>> scores["rougeL"], round(scores["bleu"], 6)
    (1.0, 100.0)
    """
    # imported here: rouge-score loads nltk, which only generation runs need
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise TrainingError(
            f"{len(predictions)} predictions and {len(references)} references; give one "
            "reference (or one list of references) per prediction."
        )
    if not predictions:
        raise TrainingError("No predictions to score; the evaluation set is empty.")
    refs = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if not all(refs):
        empty = next(i for i, ref in enumerate(refs) if not ref)
        raise TrainingError(f"Example {empty} has no reference; give it at least one.")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    per_example = [
        scorer.score_multi(ref, pred) for pred, ref in zip(predictions, refs, strict=True)
    ]
    scores = {key: float(np.mean([s[key].fmeasure for s in per_example])) for key in ROUGE_KEYS}
    width = max(len(ref) for ref in refs)
    streams = [[ref[j] if j < len(ref) else None for ref in refs] for j in range(width)]
    scores["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), streams).score)
    if answer_f1:
        best = [max(token_f1(p, r) for r in ref) for p, ref in zip(predictions, refs, strict=True)]
        scores["token_f1"] = float(np.mean(best))
    return scores

"""How a representation agrees with labels and with another representation of the same points.

- :func:`label_agreement`: ARI, AMI, NMI, homogeneity and completeness (scikit-learn) of the
  density peaks against a labelling (subjects, answer letters).
- :func:`label_overlap`: fraction of a point's nearest neighbours that share its label, with
  ``k`` proportional to the size of its class (spec §9).
- :func:`data_overlap`: fraction of nearest neighbours two representations of the same examples
  share (spec §9; fine-tuning dynamics).
- :func:`probe_accuracy`: cross-validated accuracy of a linear probe.

Quick start::

    >>> import numpy as np
    >>> labels = np.array([0, 0, 0, 1, 1, 1])
    >>> idx = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 4, 5], [4, 3, 5], [5, 4, 3]])
    >>> label_overlap(idx, labels, class_fraction=0.5)   # k = 1 per point, all neighbours agree
    1.0
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn import metrics
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from adaptlab.geometry.knn import GeometryError, Neighbours

AGREEMENT_SCORES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "ari": metrics.adjusted_rand_score,
    "ami": metrics.adjusted_mutual_info_score,
    "nmi": metrics.normalized_mutual_info_score,
    "homogeneity": metrics.homogeneity_score,
    "completeness": metrics.completeness_score,
}
"""Clustering-vs-labels scores by name: ``fn(labels_true, clusters) -> float``."""


def encode_labels(labels: np.ndarray | list, n: int, name: str = "labels") -> np.ndarray:
    """``[N]`` labels of any hashable type as int64 class codes ``0 .. C-1``.

    Raises:
        GeometryError: ``labels`` is not one label per point.
    """
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise GeometryError(
            f"{name} has shape {labels.shape} but the representation has {n} rows; "
            "pass one label per row."
        )
    return np.unique(labels, return_inverse=True)[1].astype(np.int64).ravel()


def label_agreement(clusters: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every score of :data:`AGREEMENT_SCORES` between a clustering and a labelling.

    Args:
        clusters: ``[N]`` cluster of each point (ADP ``halo=False`` labels).
        labels: ``[N]`` reference label of each point (the "true" side of homogeneity and
            completeness: homogeneity 1 means every cluster holds a single label).
    """
    return {name: float(fn(labels, clusters)) for name, fn in AGREEMENT_SCORES.items()}


def label_overlap_k(labels: np.ndarray, class_fraction: float = 0.3) -> np.ndarray:
    """``[N]`` neighbours per point for :func:`label_overlap`: ``max(1, floor(f n_{y_i}))``."""
    codes = np.unique(labels, return_inverse=True)[1].ravel()
    counts = np.bincount(codes)
    return np.maximum(1, np.floor(class_fraction * counts[codes]).astype(np.int64))


def label_overlap(idx: np.ndarray, labels: np.ndarray, class_fraction: float = 0.3) -> float:
    """Class-balanced fraction of nearest neighbours that share the point's label.

    With ``n_c`` the size of class ``c`` and ``k_i = max(1, floor(class_fraction n_{y_i}))``,
    ``chi_i = #{r <= k_i : y(nn_r(i)) = y_i} / k_i`` (self excluded) and the result is
    ``sum_i chi_i / n_{y_i} / sum_i 1 / n_{y_i}``, the mean over classes of the class-mean
    ``chi``. Same as DADApy ``return_label_overlap(labels, class_fraction=...)``.

    Args:
        idx: ``[N, k+1]`` neighbour indices, the point itself in column 0.
        labels: ``[N]`` labels of any hashable type.
        class_fraction: neighbours per point as a fraction of its class size.

    Raises:
        GeometryError: some ``k_i`` exceeds the ``k`` neighbours available. This is an error
            rather than a silent clip, so that a reported overlap always means the formula
            above; raise ``maxk`` or lower ``class_fraction``.
    """
    codes = encode_labels(labels, len(idx))
    k_i = label_overlap_k(codes, class_fraction)
    kmax = int(k_i.max())
    if kmax > idx.shape[1] - 1:
        largest = int(np.bincount(codes).max())
        raise GeometryError(
            f"label overlap with class_fraction={class_fraction} needs k={kmax} neighbours "
            f"(largest class: {largest} points) but only {idx.shape[1] - 1} are available; "
            "raise maxk or lower class_fraction."
        )
    same = codes[idx[:, 1 : kmax + 1]] == codes[:, None]
    same &= np.arange(kmax)[None, :] < k_i[:, None]
    chi = same.sum(axis=1) / k_i
    weights = 1.0 / np.bincount(codes)[codes]
    return float(np.sum(chi * weights) / np.sum(weights))


def data_overlap(a: Neighbours, b: Neighbours, k: int = 30) -> float:
    """Mean fraction of the ``k`` nearest neighbours two representations share.

    ``chi = (1/N) sum_i |N_k^A(i) & N_k^B(i)| / k``, self excluded (DADApy
    ``_compute_data_overlap``), over the N original examples. With duplicates removed, example
    ``i`` takes the neighbours of its unique row, and each neighbour is named by the original
    example that first holds it (``kept``); without duplicates this is exactly DADApy's number.

    Args:
        a: neighbours of representation A of the N examples.
        b: neighbours of representation B of the same N examples, in the same order.
        k: neighbours compared per example.

    Raises:
        GeometryError: different numbers of examples, or fewer than ``k`` neighbours.
    """
    if len(a.inverse) != len(b.inverse):
        raise GeometryError(
            f"data overlap needs the same examples in both representations, got "
            f"N={len(a.inverse)} and N={len(b.inverse)}; compare runs on the same rows."
        )
    if k < 1 or k > min(a.k, b.k):
        raise GeometryError(
            f"data overlap with k={k} needs k neighbours but the inputs have {a.k} and {b.k}; "
            "lower k or compute more neighbours."
        )
    na = a.kept[a.idx[a.inverse, 1 : k + 1]]  # [N, k] original ids of A's neighbours
    nb = b.kept[b.idx[b.inverse, 1 : k + 1]]
    both = np.sort(np.concatenate([na, nb], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)  # each list holds distinct ids
    return float(np.mean(shared / k))


class SpanProjection(TransformerMixin, BaseEstimator):
    """Rotate rows onto the span of the centred training rows: ``[n, D] -> [n, r]``, r < n.

    Computed from the ``[n, n]`` Gram matrix (one GEMM and a small eigendecomposition), which on
    wide data is far cheaper than an SVD of ``[n, D]``. The rotation is orthonormal, so linear
    models with an L2 penalty and a free intercept fit exactly as on the raw rows.
    """

    def fit(self, x: np.ndarray, y: np.ndarray | None = None) -> SpanProjection:
        self.mean_ = x.mean(axis=0)
        centred = x - self.mean_
        eigvals, eigvecs = np.linalg.eigh(centred @ centred.T)
        keep = eigvals > eigvals.max() * 1e-10
        self.components_ = (centred.T @ eigvecs[:, keep]) / np.sqrt(eigvals[keep])  # [D, r]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) @ self.components_


def probe_accuracy(
    x: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0, max_iter: int = 1000
) -> float:
    """Cross-validated accuracy of a linear probe (standardised logistic regression).

    Args:
        x: ``[N, D]`` representation.
        labels: ``[N]`` labels of any hashable type.
        folds: stratified folds (fewer when the smallest class is smaller, at least 2).
        seed: seed of the fold split.
        max_iter: L-BFGS iterations of each fit.

    Returns:
        Mean held-out accuracy over the folds; NaN when there is a single class.
    """
    codes = encode_labels(labels, len(x))
    counts = np.bincount(codes)
    if len(counts) < 2:
        return float("nan")
    n_splits = int(max(2, min(folds, counts.min())))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    # With more features than training points, rotating onto the span of the (standardised,
    # centred) training points changes nothing: the L2-penalised solution lies in that span and
    # the intercept absorbs the rest. It turns a [N, 49152] logits probe into an [N, N] one.
    steps = [StandardScaler()]
    if x.shape[1] > len(x):
        steps.append(SpanProjection())
    probe = make_pipeline(*steps, LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings():
        # a class smaller than the number of folds is expected with rare labels
        warnings.filterwarnings("ignore", message="The least populated class")
        scores = cross_val_score(probe, x, codes, cv=cv)
    return float(np.mean(scores))

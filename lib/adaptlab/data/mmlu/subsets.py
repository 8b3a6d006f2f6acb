"""Subsets of a split: per-subject samples, index masks, and per-subject loss weights (spec §3)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adaptlab.data.errors import DataError
from adaptlab.data.mmlu.examples import MMLUExample


def subset_by_subject(
    examples: Sequence[MMLUExample],
    samples_per_subject: int,
    seed: int,
    subjects: Sequence[str] | None = None,
) -> list[int]:
    """Positions in ``examples`` of at most ``samples_per_subject`` random questions per subject.

    As upstream: for each subject in sorted order, ``rng.choice(positions, min(n, count),
    replace=False)``, sorted, with one ``rng = numpy.random.default_rng(seed)``. The draw is made
    for every subject even when ``subjects`` restricts the result, so a subject's sample does not
    depend on which others are requested.

    Args:
        examples: a split, ``[N]``.
        samples_per_subject: questions kept per subject (all of them when fewer).
        seed: generator seed.
        subjects: keep only these subjects; ``None`` keeps all.

    Returns:
        Positions, grouped by sorted subject and ascending within each.

    Raises:
        DataError: ``samples_per_subject < 1``, an unknown subject name, or more questions per
            subject than any requested subject holds (the option would then do nothing).
    """
    if samples_per_subject < 1:
        raise DataError(f"samples_per_subject={samples_per_subject} must be at least 1.")
    labels = np.array([ex.subject for ex in examples])
    available = sorted(set(labels.tolist()))
    wanted = set(available if subjects is None else subjects)
    unknown = sorted(wanted - set(available))
    if unknown:
        raise DataError(
            f"Unknown subject(s) {', '.join(unknown)}; valid subjects are {', '.join(available)}."
        )
    counts = {subject: int((labels == subject).sum()) for subject in sorted(wanted)}
    largest = max(counts, key=counts.get)
    if samples_per_subject > counts[largest]:
        raise DataError(
            f"samples_per_subject={samples_per_subject} is more than any requested subject holds "
            f"(the largest, {largest}, has {counts[largest]} questions), so it would select "
            "nothing; lower it, or omit it to keep every question."
        )
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for subject in available:
        positions = np.flatnonzero(labels == subject)
        picked = rng.choice(positions, min(samples_per_subject, positions.size), replace=False)
        if subject in wanted:
            chosen.extend(np.sort(picked).tolist())
    return chosen


def load_index_mask(path: str | os.PathLike[str], n_examples: int) -> np.ndarray:
    """Read a ``.npy`` index mask: integer positions or a boolean mask over the split.

    Args:
        path: ``.npy`` file, e.g. upstream's ``test_mask_200.npy``.
        n_examples: size of the split the mask selects from.

    Returns:
        ``[n_selected]`` int64 positions, in the order stored (ascending for a boolean mask).

    Raises:
        DataError: missing or unreadable file, not 1-D, wrong dtype or length, indices out of
            range, or repeated indices.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Index mask {path} does not exist; pass the path of a .npy mask.")
    try:
        mask = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"Index mask {path} is not a readable .npy array ({err}).") from None
    if mask.ndim != 1:
        raise DataError(f"Index mask {path} has shape {mask.shape}; it must be 1-D.")
    if mask.dtype == np.bool_:
        if mask.size != n_examples:
            raise DataError(
                f"Boolean mask {path} has length {mask.size} but the split has {n_examples} "
                "examples; use the mask made for this split."
            )
        return np.flatnonzero(mask).astype(np.int64)
    if not np.issubdtype(mask.dtype, np.integer):
        raise DataError(
            f"Index mask {path} holds {mask.dtype} values; save integer positions or a boolean "
            "mask."
        )
    outside = mask[(mask < 0) | (mask >= n_examples)]
    if outside.size:
        raise DataError(
            f"Index mask {path} has {outside.size} index(es) outside 0..{n_examples - 1} (e.g. "
            f"{int(outside[0])}); it was made for another split or copy of the dataset."
        )
    if np.unique(mask).size != mask.size:
        raise DataError(f"Index mask {path} repeats some indices; each question may appear once.")
    return mask.astype(np.int64)


def sample_weights(subjects: Sequence[str]) -> np.ndarray:
    """Per-example loss weights w_i = N / (S * n_subject(i)).

    The weights sum to N and every subject carries the same total N / S.

    Args:
        subjects: subject of each example, ``[N]``.

    Returns:
        ``[N]`` float64 weights.
    """
    if not len(subjects):
        return np.zeros(0, dtype=np.float64)
    names, inverse, counts = np.unique(
        np.asarray(subjects), return_inverse=True, return_counts=True
    )
    return len(subjects) / (names.size * counts[inverse].astype(np.float64))

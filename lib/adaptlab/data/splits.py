"""Seeded k-shot splits of labelled rows (spec ``kernel.md`` §1), for any source of rows.

The task-free half of LM-BFF's generator: bucket rows by label in a seeded shuffle, take k per
label for train and k (or 10k) for dev, cap a test split at 1000; and upstream's file formats
(headerless UTF-8 CSV written by pandas, TSV read without quoting). :mod:`adaptlab.data.kshot`
applies them to the LM-BFF tasks' original files; the offline tasks apply them to rows built
in memory.

Example::

    >>> rows = [("a", "0"), ("b", "1"), ("c", "0"), ("d", "1"), ("e", "0"), ("f", "1")]
    >>> train, dev = kshot_split(rows, lambda r: r[1], k=1, seed=13, mode="k-shot")
    >>> len(train), len(dev), sorted(r[1] for r in train)
    (2, 2, ['0', '1'])
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from adaptlab.data.errors import DataError
from adaptlab.io import atomic_open

logger = logging.getLogger(__name__)

T = TypeVar("T")
MODES: tuple[str, ...] = ("k-shot", "k-shot-10x", "k-shot-1k-test")
UPSTREAM_SEEDS: tuple[int, ...] = (100, 13, 21, 42, 87)
TEST_CAP = 1000
TEST_CAP_SEED = 42


def check_mode(mode: str) -> None:
    """Raise a :class:`DataError` unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise DataError(f"Unknown k-shot mode {mode!r}; choose one of {', '.join(MODES)}.")


def dev_per_label(k: int, mode: str) -> int:
    """Dev examples per label: 10k in ``k-shot-10x``, else k."""
    check_mode(mode)
    return 10 * k if "10x" in mode else k


def label_buckets(
    items: list[T], label_of: Callable[[T], Hashable], seed: int, *, in_place: bool = False
) -> dict[Hashable, list[T]]:
    """Shuffle with ``np.random.seed(seed)`` semantics and bucket by label in shuffled order.

    Args:
        items: lines or rows.
        label_of: item -> label.
        seed: shuffle seed (``np.random.RandomState(seed).shuffle`` draws exactly what
            ``np.random.seed(seed); np.random.shuffle`` draws).
        in_place: shuffle ``items`` itself (upstream's behaviour for header-less GLUE files)
            rather than a copy.

    Returns:
        label -> items, labels in order of first appearance.
    """
    order = items if in_place else list(items)
    np.random.RandomState(seed).shuffle(order)
    buckets: dict[Hashable, list[T]] = {}
    for item in order:
        buckets.setdefault(label_of(item), []).append(item)
    return buckets


def check_buckets(
    sizes: dict[str, int],
    labels: Sequence[str],
    k: int,
    mode: str,
    task_name: str,
    allow_short: bool = False,
) -> None:
    """Check every label has k train + k (or 10k) dev examples.

    Args:
        sizes: label (as the task names it) -> examples available.
        labels: the task's labels; other labels in ``sizes`` are not checked.
        k: train examples per label.
        mode: k-shot mode (sets the dev size).
        task_name: for the message.
        allow_short: log a warning instead of raising.

    Raises:
        DataError: a label with fewer examples than needed (or none).
    """
    if k < 1:
        raise DataError(f"k={k} must be at least 1 (training examples per label).")
    need = k + dev_per_label(k, mode)
    for label in labels:
        have = sizes.get(label, 0)
        if have >= need:
            continue
        message = (
            f"Task {task_name}: label {label!r} has {have} training example(s), fewer than the "
            f"{need} that k={k} in mode {mode} needs ({k} train + {need - k} dev)"
        )
        if not allow_short:
            raise DataError(message + "; lower k or use a larger original training set.")
        logger.warning("%s; writing a short split as upstream does.", message)


def take_shots(buckets: dict[Hashable, list[T]], k: int, mode: str) -> tuple[list[T], list[T]]:
    """Train = first k of each bucket, dev = the next k (10k in ``k-shot-10x``)."""
    stop = k + dev_per_label(k, mode)
    train = [item for bucket in buckets.values() for item in bucket[:k]]
    dev = [item for bucket in buckets.values() for item in bucket[k:stop]]
    return train, dev


def kshot_split(
    items: Sequence[T],
    label_of: Callable[[T], str],
    k: int,
    seed: int,
    mode: str = "k-shot",
    *,
    labels: Sequence[str] | None = None,
    task_name: str = "task",
    allow_short: bool = False,
) -> tuple[list[T], list[T]]:
    """The k-shot train and dev examples of one seed (a copy of ``items`` is shuffled).

    Args:
        items: the training pool, in original order.
        label_of: item -> label string.
        k: train examples per label.
        seed: data seed.
        mode: ``k-shot``, ``k-shot-10x`` or ``k-shot-1k-test``.
        labels: labels that must be fully present (default: every label found).
        task_name: for error messages.
        allow_short: write short buckets with a warning instead of raising.

    Returns:
        ``(train, dev)``, each grouped by label in order of first appearance after shuffling.

    Raises:
        DataError: bad mode or k, or a label without enough examples.
    """
    check_seed(seed)
    buckets = label_buckets(list(items), label_of, seed)
    sizes = {str(label): len(bucket) for label, bucket in buckets.items()}
    check_buckets(sizes, labels or list(sizes), k, mode, task_name, allow_short)
    return take_shots(buckets, k, mode)


def cap_test(items: list[T], mode: str) -> list[T]:
    """``k-shot-1k-test``: the first 1000 after a seed-42 shuffle (a copy); else ``items``."""
    if "1k-test" not in mode or len(items) <= TEST_CAP:
        return items
    items = list(items)
    np.random.RandomState(TEST_CAP_SEED).shuffle(items)
    return items[:TEST_CAP]


def check_test_limit(test_limit: int | None) -> None:
    """Raise a :class:`DataError` unless ``test_limit`` is None or positive."""
    if test_limit is not None and test_limit < 1:
        raise DataError(f"test_limit={test_limit} must be positive (or None for all).")


def limit_test(items: list[T], test_limit: int | None) -> list[T]:
    """``test_limit`` items drawn without replacement by ``numpy.random.default_rng(0)``, in
    their original order (a plain head would keep one label of a file sorted by label).

    Raises:
        DataError: ``test_limit`` is not positive.
    """
    check_test_limit(test_limit)
    if test_limit is None or test_limit >= len(items):
        return items
    keep = np.sort(np.random.default_rng(0).choice(len(items), test_limit, replace=False))
    return [items[i] for i in keep]


def check_seed(seed: int) -> None:
    """Raise a :class:`DataError` unless numpy accepts ``seed``."""
    if not 0 <= seed < 2**32:
        raise DataError(f"seed={seed} is outside [0, 2**32), the range numpy seeds accept.")


def csv_label(raw: Any, offset: int = 0) -> str:
    """A CSV label cell (pandas int, float or str) as a label string, plus ``offset``."""
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return str(raw)
    if number.is_integer():
        return str(int(number) + offset)
    return str(raw)


def write_csv(path: Path, frame: Any) -> None:
    """Write a DataFrame as upstream's generator does: no header, no index, UTF-8, atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(frame.to_csv(header=False, index=False).encode("utf-8"))


def read_tsv(path: Path) -> list[list[str]]:
    """Rows of a TSV file as upstream's processors read them (no quoting, BOM dropped)."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quotechar=None))

"""The fixed test split of the offline tasks, whose sources have no official one.

Each offline task (``mmlu-topics``, ``bbc-news``, ``tweet-sentiment``) holds out the same
examples for every data seed: ``per_class`` examples of each class, drawn without replacement by
one ``numpy.random.default_rng(seed)`` in class order. The test set is balanced and ordered by
class, then by position in the source; the rest of each class is the training pool that the
k-shot train and dev splits are drawn from (:func:`adaptlab.data.splits.kshot_split`).

Example::

    >>> rows = {"a": [TextRow(f"a{i}", "x", "a") for i in range(4)],
    ...         "b": [TextRow(f"b{i}", "y", "b") for i in range(3)]}
    >>> pool, test = hold_out(rows, per_class=1, seed=0, task_name="demo")
    >>> len(pool), sorted(row.label for row in test)
    (5, ['a', 'b'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np

from adaptlab import assets
from adaptlab.data.errors import DataError

T = TypeVar("T")


class TextRow(NamedTuple):
    """One example of an offline task: a stable ``guid``, its text and its label."""

    guid: str
    text: str
    label: str


def hold_out(
    groups: dict[str, list[T]], per_class: int, seed: int, *, task_name: str
) -> tuple[list[T], list[T]]:
    """Split each class into a held-out test part of ``per_class`` items and a training pool.

    Args:
        groups: label -> items in source order, in class order (the draw order).
        per_class: test items per class.
        seed: seed of the one generator that draws every class in turn.
        task_name: for error messages.

    Returns:
        ``(pool, test)``, both grouped by class in class order, in source order within a class.

    Raises:
        DataError: a class with no more items than ``per_class`` (nothing left to train on).
    """
    rng = np.random.default_rng(seed)
    pool: list[T] = []
    test: list[T] = []
    for label, group in groups.items():
        if len(group) <= per_class:
            raise DataError(
                f"Task {task_name}: class {label!r} has {len(group)} example(s), not more than "
                f"the {per_class} held out for testing; the source data is incomplete."
            )
        held = set(rng.choice(len(group), per_class, replace=False).tolist())
        test += [item for i, item in enumerate(group) if i in held]
        pool += [item for i, item in enumerate(group) if i not in held]
    return pool, test


def held_out_pool(
    items: Sequence[T],
    label_of: Callable[[T], str],
    labels: Sequence[str],
    per_class: int,
    seed: int,
    *,
    task_name: str,
    asset: str,
    counts: dict[str, Any],
) -> tuple[list[T], list[T], dict[str, Any]]:
    """:func:`hold_out` over ``items`` grouped by ``labels``, with the task's provenance.

    Args:
        items: the cleaned source rows.
        label_of: an item's label.
        labels: the classes, in draw order.
        per_class, seed, task_name: as for :func:`hold_out`.
        asset: the embedded asset the items were read from (its pinned wheel and hashes).
        counts: what reading and cleaning kept and dropped (named entries, e.g.
            ``{"cleaning": {...}}``), recorded in the provenance as given.

    Returns:
        ``(pool, test, provenance)``.
    """
    groups = {label: [item for item in items if label_of(item) == label] for label in labels}
    pool, test = hold_out(groups, per_class, seed, task_name=task_name)
    provenance = {
        "source": "offline",
        "data": assets.describe(asset),
        **counts,
        "test_per_class": per_class,
        "pool_seed": seed,
        "train_pool_sizes": {label: len(group) - per_class for label, group in groups.items()},
    }
    return pool, test, provenance

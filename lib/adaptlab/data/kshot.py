"""The k-shot split generator of LM-BFF / LM-Kernel-FT (spec ``kernel.md`` §1).

For each task and seed, the training file of the original data is shuffled with
``np.random.seed(seed); np.random.shuffle(lines)`` and bucketed by label in shuffled order;
train takes the first k lines of each bucket, dev the next k (``k-shot``, ``k-shot-1k-test``) or
the next 10k (``k-shot-10x``), both grouped by label in order of first appearance. The test split
is the original dev set(s) for GLUE tasks (renamed ``dev`` -> ``test``, so MNLI gets
``test_matched.tsv`` and ``test_mismatched.tsv``) and the original ``test.csv`` otherwise;
``k-shot-1k-test`` caps it at 1000 examples (TSV: ``np.random.seed(42)``, shuffle, first 1000;
CSV: ``DataFrame.sample(n=1000, random_state=42)``). Output::

    <out_dir>/<mode>/<TASK>/<K>-<SEED>/{train,dev,test}.{tsv|csv}   (MNLI: dev_matched.tsv)

The files are byte-identical to upstream's: TSV lines are copied as read (header included),
CSV files are written by pandas as upstream does. One upstream quirk is kept on purpose: a GLUE
file without a header (CoLA) is shuffled *in place*, so across the seeds of one call each
shuffle starts from the previous seed's order (and, in ``k-shot-1k-test``, CoLA's test set is
reshuffled with seed 42 once per seed). Pass the seeds in upstream's order,
``UPSTREAM_SEEDS = (100, 13, 21, 42, 87)``, to get its CoLA splits; other tasks do not depend on
the order. Any seed in ``[0, 2**32)`` works, 0 included (the grafting repo's seed).

Differences from upstream, all raised before anything is written: a missing file or folder is
a :class:`DataError` naming it, and a label bucket with fewer than ``k`` train + ``k``/``10k``
dev lines is a :class:`DataError` naming the task, label and count (upstream silently wrote
short, unbalanced splits; ``allow_short=True`` does that again, with a warning). Rows whose
label is not one of the task's (e.g. QQP's broken lines) form their own buckets and are
written, as upstream does; the loader skips or rejects them as the processors do.

Not reproduced: the kernel repo's ``data/download_dataset.sh`` step that rebalances ``cr`` to
250 test examples per class (it edits and runs ``cr/process.py`` from the LM-BFF tarball: run
it on the original folder first).

The task-free splitting lives in :mod:`adaptlab.data.splits`; this module reads and writes
the LM-BFF tasks' files with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from adaptlab.data.errors import DataError
from adaptlab.data.splits import (
    MODES,
    TEST_CAP,
    TEST_CAP_SEED,
    UPSTREAM_SEEDS,
    check_buckets,
    check_mode,
    check_seed,
    csv_label,
    label_buckets,
    take_shots,
    write_csv,
)
from adaptlab.data.tasks import FileLayout, Task, get_task
from adaptlab.io import atomic_open

logger = logging.getLogger(__name__)

Mode = Literal["k-shot", "k-shot-10x", "k-shot-1k-test"]
# Upstream's split_header returns CoLA's (header-less) line list itself, so its shuffles act in
# place and carry over from seed to seed; every other task's lines are copied first.
SHUFFLED_IN_PLACE = frozenset({"CoLA"})
# The LM-BFF tasks of upstream's generator (its default list without STS-B, which adaptlab
# does not register); ag_news needs its own original folder.
LM_BFF_TASKS: tuple[str, ...] = (
    "SST-2",
    "sst-5",
    "mr",
    "cr",
    "mpqa",
    "subj",
    "trec",
    "CoLA",
    "MRPC",
    "QQP",
    "MNLI",
    "SNLI",
    "QNLI",
    "RTE",
)


# ---------------------------------------------------------------------------------------------
# Original data -> k-shot folders


@dataclass
class OriginalData:
    """One task's original files, as read (TSV lines or CSV rows)."""

    task: Task
    files: list[Path]
    train: list[Any]
    header: list[str]
    evals: dict[str, Any] = field(default_factory=dict)  # original stem -> lines / DataFrame


def original_files(task: Task, original_dir: str | Path) -> list[Path]:
    """The original files a task's splits are made from (training file first).

    Raises:
        DataError: the task has no file layout (offline tasks) or a file is missing.
    """
    layout = _layout(task)
    folder = Path(original_dir).expanduser() / task.data_name
    paths = [folder / f"{stem}.{layout.format}" for stem in ("train", *layout.original_eval)]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DataError(
            f"Task {task.name}: original file(s) {', '.join(missing)} do not exist; put the "
            f"original data in {folder} (LM-BFF layout) or use from_hub=true."
        )
    return paths


def read_original(task: Task, original_dir: str | Path) -> OriginalData:
    """Read a task's original training and evaluation files.

    Raises:
        DataError: the task has no file layout (offline tasks) or a file is missing.
    """
    layout = _layout(task)
    paths = original_files(task, original_dir)
    stems = [path.stem for path in paths]
    if layout.format == "tsv":
        data = {stem: _read_lines(path) for stem, path in zip(stems, paths, strict=True)}
        header, train = _split_header(data.pop("train"), layout.header)
        return OriginalData(task, paths, train, header, data)
    import pandas as pd

    frames = {stem: pd.read_csv(path, header=None) for stem, path in zip(stems, paths, strict=True)}
    train = frames.pop("train").values.tolist()
    return OriginalData(task, paths, train, [], frames)


def generate_kshot(
    task: Task,
    original_dir: str | Path,
    out_dir: str | Path,
    *,
    k: int,
    seeds: Sequence[int] = UPSTREAM_SEEDS,
    mode: str = "k-shot",
    allow_short: bool = False,
    original: OriginalData | None = None,
) -> list[Path]:
    """Write the k-shot folders of one task for each seed, in the given order.

    Args:
        task: a task with a file layout.
        original_dir: folder holding ``<data_name>/`` with the original files.
        out_dir: root of the output; folders go to ``<out_dir>/<mode>/<data_name>/<k>-<seed>``.
        k: training examples per label.
        seeds: data seeds, generated in this order (see the module docstring for CoLA).
        mode: ``k-shot``, ``k-shot-10x`` or ``k-shot-1k-test``.
        allow_short: write short label buckets (with a warning) instead of raising.
        original: already-read original data (:func:`read_original`), else it is read.

    Returns:
        The written folders, one per seed.

    Raises:
        DataError: bad mode, k or seed, a missing file, or too few examples of a label.
    """
    check_mode(mode)
    for seed in seeds:
        check_seed(seed)
    layout = _layout(task)
    original = original or read_original(task, original_dir)
    label_of = _line_label(layout) if layout.format == "tsv" else _row_label(layout)
    if task.regression is not None:  # LM-BFF buckets STS-B by its score bin (score < 2.5)
        label_of = _score_bin(task, label_of)
    sizes: dict[str, int] = {}
    for item in original.train:
        label = _normalise_label(label_of(item), layout)
        sizes[label] = sizes.get(label, 0) + 1
    check_buckets(sizes, task.labels, k, mode, task.name, allow_short)
    unexpected = {label: n for label, n in sizes.items() if label not in task.labels}
    if unexpected:
        logger.warning(
            "Task %s: %d training line(s) with unexpected labels (%s) are bucketed and written "
            "as upstream does.",
            task.name,
            sum(unexpected.values()),
            ", ".join(sorted(unexpected)[:5]),
        )
    in_place = task.name in SHUFFLED_IN_PLACE
    folders = []
    for seed in seeds:
        folder = Path(out_dir).expanduser() / mode / task.data_name / f"{k}-{seed}"
        buckets = label_buckets(original.train, label_of, seed, in_place=in_place)
        train, dev = take_shots(buckets, k, mode)
        if layout.format == "tsv":
            _write_tsv_splits(folder, original, layout, train, dev, mode, in_place)
        else:
            _write_csv_splits(folder, original, layout, train, dev, mode)
        folders.append(folder)
    return folders


def _layout(task: Task) -> FileLayout:
    if task.offline or task.layout is None:
        raise DataError(
            f"Task {task.name} is built in memory (no original files); write its k-shot files "
            "with adaptlab.data.offline.write_offline_kshot (scripts/prepare_fewshot.py does)."
        )
    return task.layout


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return handle.readlines()


def _split_header(lines: list[str], header: bool) -> tuple[list[str], list[str]]:
    """Upstream's split_header: a header-less file gives back the very same list."""
    return (lines[:1], lines[1:]) if header else ([], lines)


def _line_label(layout: FileLayout) -> Callable[[str], str]:
    """Upstream's ``get_label``: the stripped line split on tabs, at the generator's column."""
    column = layout.label_column if layout.kshot_label_column is None else layout.kshot_label_column

    def label_of(line: str) -> str:
        return line.strip().split("\t")[column]

    return label_of


def _score_bin(task: Task, label_of: Callable[[Any], Any]) -> Callable[[Any], str]:
    """A regression task's bucket: the bin label of the line's score (the line is kept)."""

    def bin_of(item: Any) -> str:
        return task.score_label(label_of(item), f"Training line {str(item).strip()[:60]!r}")[0]

    return bin_of


def _row_label(layout: FileLayout) -> Callable[[list[Any]], Any]:
    def label_of(row: list[Any]) -> Any:
        return row[layout.label_column]

    return label_of


def _normalise_label(raw: Any, layout: FileLayout) -> str:
    """A raw label as the task names it."""
    return str(raw) if layout.format == "tsv" else csv_label(raw, layout.label_offset)


def _write_tsv_splits(
    folder: Path,
    original: OriginalData,
    layout: FileLayout,
    train: list[str],
    dev: list[str],
    mode: str,
    in_place: bool,
) -> None:
    for stem, lines in original.evals.items():
        header, rows = _split_header(lines, layout.header)
        if "1k-test" in mode and len(rows) > TEST_CAP:
            rows = rows if in_place else list(rows)
            np.random.RandomState(TEST_CAP_SEED).shuffle(rows)
            rows = rows[:TEST_CAP]
        _write_text(folder / f"{stem.replace('dev', 'test')}.tsv", [*header, *rows])
    _write_text(folder / "train.tsv", [*original.header, *train])
    _write_text(folder / f"{layout.dev}.tsv", [*original.header, *dev])


def _write_csv_splits(
    folder: Path,
    original: OriginalData,
    layout: FileLayout,
    train: list[list[Any]],
    dev: list[list[Any]],
    mode: str,
) -> None:
    from pandas import DataFrame

    for stem, frame in original.evals.items():
        if "1k-test" in mode and len(frame.index) > TEST_CAP:
            frame = frame.sample(n=TEST_CAP, random_state=TEST_CAP_SEED)
        write_csv(folder / f"{stem.replace('dev', 'test')}.csv", frame)
    write_csv(folder / "train.csv", DataFrame(train))
    write_csv(folder / f"{layout.dev}.csv", DataFrame(dev))


def _write_text(path: Path, lines: list[str]) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write("".join(lines).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# The recipe's typed config


@dataclass
class PrepareConfig:
    """Write LM-BFF k-shot splits from the original data (or from the hub).

    Args:
        tasks: task names of ``adaptlab.data.TASKS`` (default: the LM-BFF tasks of upstream's
            generator; add ``ag_news`` when its original folder exists). The offline tasks
            (``mmlu-topics``, ``bbc-news``, ``tweet-sentiment``, ...) need no original files:
            their splits are written from the embedded data.
        original_dir: folder with one sub-folder per task in the original layout.
        out_dir: root of the k-shot folders: ``<out_dir>/<mode>/<TASK>/<K>-<SEED>/``.
        mode: ``k-shot``, ``k-shot-10x`` (10k dev per label) or ``k-shot-1k-test`` (test
            capped at 1000, the kernel repo's setting).
        k: training examples per label (dev gets as many, or 10x).
        seeds: data seeds, generated in this order (upstream's order matters for CoLA).
        from_hub: first download the tasks from the Hugging Face hub into ``original_dir``
            (GLUE, SNLI, trec, ag_news, imdb, yelp_polarity, amazon_polarity; needs a network).
        allow_short: write short label buckets with a warning, as upstream did, instead of
            failing.
    """

    tasks: list[str] = field(default_factory=lambda: list(LM_BFF_TASKS))
    original_dir: str = "data/original"
    out_dir: str = "data"
    mode: Mode = "k-shot"
    k: int = 16
    seeds: list[int] = field(default_factory=lambda: list(UPSTREAM_SEEDS))
    from_hub: bool = False
    allow_short: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.k >= 1, f"k={self.k} must be at least 1 (training examples per label)."),
            (bool(self.seeds), "seeds is empty; give at least one data seed, e.g. [13]."),
            (len(set(self.seeds)) == len(self.seeds), f"seeds={self.seeds} repeats a seed."),
            (
                all(0 <= seed < 2**32 for seed in self.seeds),
                f"seeds={self.seeds}: every seed must lie in [0, 2**32).",
            ),
            (bool(self.tasks), "tasks is empty; name at least one task, e.g. [SST-2]."),
            (self.mode in MODES, f"mode={self.mode!r}: choose one of {', '.join(MODES)}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.tasks = [get_task(name).name for name in self.tasks]

"""Fetch few-shot tasks from the Hugging Face hub into the LM-BFF original-data layout.

:func:`download_original` writes ``<original_dir>/<TASK>/`` with the files and columns the
task's processor reads (see ``FileLayout`` in :mod:`adaptlab.data.tasks`), so that the k-shot
generator and the loader treat hub data like the LM-BFF tarball. Columns upstream reads but the
hub copy lacks (MNLI's parses, MRPC's ids) are left empty; tabs and newlines inside texts become
spaces. Labels are mapped by their ``ClassLabel`` names where the hub's order differs from the
processor's (NLI label names, TREC's coarse classes).

Available: the GLUE tasks (SST-2, CoLA, MNLI, QNLI, RTE, MRPC, QQP), SNLI, trec, ag_news (and
``ag_news-graft``), imdb, yelp_polarity and amazon_polarity. The LM-BFF copies of sst-5, mr,
cr, mpqa and subj, and ANLI, HANS and the MNLI genre splits have no hub source here: use the
LM-BFF tarball (or build the files in the documented layout). Splits made from hub data are
only identical to upstream's when the hub files equal the tarball's (GLUE's are the same data;
the others differ in size or text).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptlab.data.errors import DataError
from adaptlab.data.tasks import Task
from adaptlab.io import atomic_open

logger = logging.getLogger(__name__)

Row = dict[str, Any]


@dataclass(frozen=True)
class HubSource:
    """One hub dataset and how its rows become original-layout lines.

    Attributes:
        path: dataset id on the hub.
        config: dataset config name, if any.
        splits: hub split -> original file stem.
        fields: (row, label string) -> the columns of one line.
        header: header columns of TSV files (None: no header line).
        label_names: use the ``ClassLabel`` name as the label (else the index).
        label_map: label string -> the label the processor expects.
        label_offset: added to integer labels (CSV files that count classes from 1).
    """

    path: str
    config: str | None
    splits: dict[str, str]
    fields: Callable[[Row, str], list[Any]]
    header: tuple[str, ...] | None = None
    label_names: bool = False
    label_map: dict[str, str] | None = None
    label_offset: int = 0


_GLUE = "nyu-mll/glue"
_TRAIN_DEV = {"train": "train", "validation": "dev"}
_MNLI_COLUMNS = (
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
)
_SNLI_COLUMNS = (
    "index",
    "captionID",
    "pairID",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
)
# TREC's coarse classes in LM-BFF's order (Description ... Number).
_TREC = {"DESC": "0", "ENTY": "1", "ABBR": "2", "HUM": "3", "LOC": "4", "NUM": "5"}

HUB_SOURCES: dict[str, HubSource] = {
    "SST-2": HubSource(
        _GLUE, "sst2", _TRAIN_DEV, lambda r, y: [r["sentence"], y], header=("sentence", "label")
    ),
    "CoLA": HubSource(
        _GLUE, "cola", _TRAIN_DEV, lambda r, y: ["hub", y, "" if y == "1" else "*", r["sentence"]]
    ),
    "MNLI": HubSource(
        _GLUE,
        "mnli",
        {
            "train": "train",
            "validation_matched": "dev_matched",
            "validation_mismatched": "dev_mismatched",
        },
        lambda r, y: [r["idx"], "", "", "", "", "", "", "", r["premise"], r["hypothesis"], y, y],
        header=_MNLI_COLUMNS,
        label_names=True,
    ),
    "QNLI": HubSource(
        _GLUE,
        "qnli",
        _TRAIN_DEV,
        lambda r, y: [r["idx"], r["question"], r["sentence"], y],
        header=("index", "question", "sentence", "label"),
        label_names=True,
    ),
    "RTE": HubSource(
        _GLUE,
        "rte",
        _TRAIN_DEV,
        lambda r, y: [r["idx"], r["sentence1"], r["sentence2"], y],
        header=("index", "sentence1", "sentence2", "label"),
        label_names=True,
    ),
    "MRPC": HubSource(
        _GLUE,
        "mrpc",
        _TRAIN_DEV,
        lambda r, y: [y, "", "", r["sentence1"], r["sentence2"]],
        header=("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
    ),
    "QQP": HubSource(
        _GLUE,
        "qqp",
        _TRAIN_DEV,
        lambda r, y: [r["idx"], "", "", r["question1"], r["question2"], y],
        header=("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
    ),
    "SNLI": HubSource(
        "stanfordnlp/snli",
        None,
        _TRAIN_DEV,
        lambda r, y: ["", "", "", "", "", "", "", r["premise"], r["hypothesis"], y, y],
        header=_SNLI_COLUMNS,
        label_names=True,
    ),
    "trec": HubSource(
        "CogComp/trec",
        None,
        {"train": "train", "test": "test"},
        lambda r, y: [int(y), r["text"]],
        label_names=True,
        label_map=_TREC,
    ),
    "ag_news": HubSource(
        "fancyzhx/ag_news",
        None,
        {"train": "train", "test": "test"},
        lambda r, y: [int(y), "", r["text"]],
        label_offset=1,
    ),
    "ag_news-graft": HubSource(
        "fancyzhx/ag_news", None, {"train": "train", "test": "test"}, lambda r, y: [r["text"], y]
    ),
    "imdb": HubSource(
        "stanfordnlp/imdb", None, {"train": "train", "test": "test"}, lambda r, y: [r["text"], y]
    ),
    "yelp_polarity": HubSource(
        "fancyzhx/yelp_polarity",
        None,
        {"train": "train", "test": "test"},
        lambda r, y: [r["text"], y],
    ),
    "amazon_polarity": HubSource(
        "fancyzhx/amazon_polarity",
        None,
        {"train": "train", "test": "test"},
        lambda r, y: [int(y), r["title"], r["content"]],
        label_offset=1,
    ),
}


def hub_source(task: Task) -> HubSource:
    """The hub source of a task.

    Raises:
        DataError: the task has no hub source.
    """
    source = HUB_SOURCES.get(task.name)
    if source is None:
        raise DataError(
            f"Task {task.name} has no hub source (tasks with one: {', '.join(HUB_SOURCES)}); "
            "put its LM-BFF original files in original_dir instead."
        )
    return source


def download_original(task: Task, original_dir: str | Path) -> Path:
    """Download a task from the hub and write its original-layout files.

    Args:
        task: a task with a hub source.
        original_dir: the original-data root; files go to ``<original_dir>/<data_name>/``.

    Returns:
        The task's original folder.

    Raises:
        DataError: no hub source, or the download failed (offline, unknown dataset).
    """
    source = hub_source(task)
    assert task.layout is not None
    try:
        import datasets

        parts = {
            stem: datasets.load_dataset(source.path, source.config, split=split)
            for split, stem in source.splits.items()
        }
    except Exception as err:  # network, hub and cache errors all mean "could not download"
        raise DataError(
            f"Could not download {source.path}{'/' + source.config if source.config else ''} "
            f"for task {task.name} from the hub ({type(err).__name__}: {err}); check the "
            "network or put the original files in original_dir."
        ) from None
    folder = Path(original_dir).expanduser() / task.data_name
    for stem, dataset in parts.items():
        labelled = ((row, _label(row, dataset, source)) for row in dataset)
        rows = [source.fields(row, label) for row, label in labelled if label is not None]
        path = folder / f"{stem}.{task.layout.format}"
        if task.layout.format == "tsv":
            _write_tsv(path, rows, source.header)
        else:
            _write_csv(path, rows)
        logger.info("Wrote %d rows of %s to %s.", len(rows), source.path, path)
    return folder


def _label(row: Row, dataset: Any, source: HubSource) -> str | None:
    """The row's label as the processor names it; None for unlabelled rows (SNLI's -1)."""
    column = "coarse_label" if "coarse_label" in row else "label"
    value = row[column]
    if value < 0:
        return None
    if source.label_names:
        label = dataset.features[column].int2str(value)
    else:
        label = str(int(value) + source.label_offset)
    return source.label_map[label] if source.label_map else label


def _clean(value: Any) -> str:
    return " ".join(str(value).replace("\t", " ").splitlines())


def _write_tsv(path: Path, rows: list[list[Any]], header: tuple[str, ...] | None) -> None:
    lines = [] if header is None else ["\t".join(header)]
    lines += ["\t".join(_clean(value) for value in row) for row in rows]
    with atomic_open(path, "wb") as handle:
        handle.write(("\n".join(lines) + "\n").encode("utf-8"))


def _write_csv(path: Path, rows: list[list[Any]]) -> None:
    from pandas import DataFrame

    with atomic_open(path, "wb") as handle:
        handle.write(DataFrame(rows).to_csv(header=False, index=False).encode("utf-8"))

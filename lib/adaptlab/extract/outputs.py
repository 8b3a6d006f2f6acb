"""The extraction output folder: its layout, run identity, statistics and manifest.

Layout of ``output_dir``::

    manifest.json            what was run and where every file is (written last)
    statistics.json          per-example subject, gold letter, predictions; accuracies
    {point}/l{i}.safetensors one tensor ``repr`` of shape [N, hidden] (logits: [N, vocab])
    .parts/                  chunk files and run.json while the run is in progress

A run is identified by a fingerprint of everything that changes its arrays (model, data,
prompt settings, points, token rule, dtypes) and not by what does not (batch size, number of
processes). A folder holding another fingerprint is refused unless ``overwrite`` is set, and
``overwrite`` removes only the entries above (see ``adaptlab.rundir``).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from adaptlab.extract.points import POINTS
from adaptlab.io import read_json
from adaptlab.rundir import LOCK_FILE, Layout, OutputDirError, clear_owned

MANIFEST = "manifest.json"
STATISTICS = "statistics.json"
PARTS = ".parts"
RUN_FILE = "run.json"


LAYOUT = Layout(
    "extraction",
    markers=(MANIFEST, f"{PARTS}/{RUN_FILE}"),
    owned=(MANIFEST, STATISTICS, PARTS, *POINTS),
)
"""What an extraction writes: ``--overwrite`` removes these entries and nothing else."""


def fingerprint(identity: dict) -> str:
    """sha256 of the canonical JSON of ``identity``."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def layer_file(point: str, layer: int) -> str:
    """Relative path of the file holding ``point`` at label ``l{layer}``."""
    return f"{point}/l{layer}.safetensors"


def has_chunks(out: Path) -> bool:
    """Whether ``out/.parts`` holds finished chunk files (work a different run would destroy)."""
    return any((out / PARTS).glob("chunk_*.safetensors"))


def check_output_dir(
    out: Path, run_id: str, overwrite: bool
) -> Literal["new", "resume", "complete"]:
    """Decide what to do with ``out`` before any heavy work; writes nothing.

    Returns ``complete`` when it already holds this run's finished files, ``resume`` when it
    holds this run's unfinished chunks, ``new`` otherwise. A ``.parts/run.json`` of another run
    that never finished a chunk (a run that failed while loading) does not block a new run.

    Raises:
        OutputDirError: ``out`` holds another run's files and ``overwrite`` is not set, or
            files that are not an extraction's (whatever ``overwrite`` says: it removes only an
            extraction's own files).
    """
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise OutputDirError(f"--output_dir {out} is a file; pass a folder path.")
    for name, state in ((MANIFEST, "complete"), (f"{PARTS}/{RUN_FILE}", "resume")):
        path = out / name
        if path.exists():
            if read_json(path).get("fingerprint") == run_id:
                return state  # type: ignore[return-value]
            if overwrite or (state == "resume" and not has_chunks(out)):
                return "new"
            raise OutputDirError(
                f"--output_dir {out} holds a different run's files; pass a new "
                "--output_dir or --overwrite true to replace them."
            )
    if any(p.name != LOCK_FILE for p in out.iterdir()):
        raise OutputDirError(
            f"--output_dir {out} is not empty and holds no adaptlab extraction; pass an empty "
            "or new folder (--overwrite removes only an extraction's own files)."
        )
    return "new"


def clear_output_dir(out: Path) -> None:
    """Remove a previous extraction's files from ``out`` (the folder is locked by this run)."""
    clear_owned(out, LAYOUT)


def accuracy(correct: Sequence[bool], subjects: Sequence[str]) -> dict:
    """Micro accuracy, per-subject accuracy and macro (mean over subjects) accuracy."""
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for ok, subject in zip(correct, subjects, strict=True):
        by_subject[subject].append(ok)
    per_subject = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    return {
        "micro": sum(correct) / max(len(correct), 1),
        "macro": sum(per_subject.values()) / max(len(per_subject), 1),
        "subjects": per_subject,
    }


def statistics(
    rows: Sequence[int],
    subjects: Sequence[str],
    answers: Sequence[str],
    predictions: Sequence[str] | None,
    constrained: Sequence[str] | None,
) -> dict:
    """Per-example records and accuracies, unconstrained and constrained to A-D.

    Args:
        rows: dataset row of each example (the row order of every ``[N, ...]`` file).
        subjects, answers: subject and gold letter of each example.
        predictions: decoded argmax over the vocabulary at the last token, stripped (None for a
            model without an LM head; accuracies are then None too).
        constrained: argmax over the four answer-letter tokens (None likewise).
    """

    def scored(preds: Sequence[str] | None) -> dict | None:
        if preds is None:
            return None
        return accuracy([p == a for p, a in zip(preds, answers, strict=True)], subjects)

    return {
        "n_examples": len(rows),
        "rows": list(rows),
        "subjects": list(subjects),
        "answers": list(answers),
        "predictions": None if predictions is None else list(predictions),
        "constrained_predictions": None if constrained is None else list(constrained),
        "accuracy": scored(predictions),
        "constrained_accuracy": scored(constrained),
    }


def accuracy_summary(stats: dict) -> dict | None:
    """The four headline accuracies of :func:`statistics` output (None without predictions)."""
    if stats["accuracy"] is None:
        return None
    return {
        "micro": stats["accuracy"]["micro"],
        "macro": stats["accuracy"]["macro"],
        "constrained_micro": stats["constrained_accuracy"]["micro"],
        "constrained_macro": stats["constrained_accuracy"]["macro"],
    }

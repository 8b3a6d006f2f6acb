"""MMLU's data types: a question, a loaded split with its shot pool, a tokenised prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Letter = Literal["A", "B", "C", "D"]
LETTERS: tuple[Letter, Letter, Letter, Letter] = ("A", "B", "C", "D")
MAX_SHOTS = 5  # cais/mmlu's dev split holds exactly 5 questions per subject


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


def group_by_subject(examples: Sequence[MMLUExample]) -> dict[str, list[MMLUExample]]:
    """Examples grouped by subject, keeping their order within each subject."""
    groups: dict[str, list[MMLUExample]] = {}
    for ex in examples:
        groups.setdefault(ex.subject, []).append(ex)
    return groups

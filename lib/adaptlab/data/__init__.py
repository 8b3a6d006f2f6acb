"""Datasets and prompt builders.

Everything a script needs from MMLU is re-exported here::

    from adaptlab.data import load_mmlu, tokenize_prompts

    splits = load_mmlu()  # embedded copy by default; splits.provenance goes in the manifest
    prompts = tokenize_prompts(splits.test, splits.dev, tokenizer, num_shots=5, seed=42,
                               max_seq_len=4090)
"""

from __future__ import annotations

from adaptlab.data.errors import DataError
from adaptlab.data.mmlu import (
    LETTERS,
    MAX_SHOTS,
    MMLUExample,
    MMLUSplits,
    TokenizedPrompt,
    answer_letter_ids,
    build_prompt,
    build_prompts,
    build_train_text,
    dataset_fingerprint,
    format_shot,
    group_by_subject,
    header,
    load_index_mask,
    load_mmlu,
    question_block,
    sample_weights,
    select_shots,
    subset_by_subject,
    tokenize_prompts,
)

__all__ = [
    "LETTERS",
    "MAX_SHOTS",
    "DataError",
    "MMLUExample",
    "MMLUSplits",
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
    "subset_by_subject",
    "tokenize_prompts",
]

"""Datasets and prompt builders.

Everything a script needs from MMLU is re-exported here::

    from adaptlab.data import load_mmlu, tokenize_prompts

    splits = load_mmlu()  # embedded copy by default; splits.provenance goes in the manifest
    prompts = tokenize_prompts(splits.test, splits.dev, tokenizer, num_shots=5, seed=42,
                               max_seq_len=4090)

and so is the few-shot (LM-BFF) task layer::

    from adaptlab.data import load_task, encode_examples, collate_prompts, label_word_ids

    splits = load_task("mmlu-topics-2", k=16, seed=13)  # offline; "SST-2" etc. need data_dir
    examples = encode_examples(splits.train, splits.task, tokenizer, kind="causal")

The offline tasks (``mmlu-topics``, ``mmlu-topics-2``, the subject-shift pair
``mmlu-topics-id`` / ``mmlu-topics-ood``, ``bbc-news``, ``tweet-sentiment``) are built from
embedded data (:mod:`adaptlab.data.offline`); ``load_headlines`` gives the BBC
title-from-body generation task on the same articles.
"""

from __future__ import annotations

from adaptlab.data.bbc import HeadlineExample, HeadlineSplits, load_headlines
from adaptlab.data.errors import DataError
from adaptlab.data.fewshot import (
    SCORINGS,
    FewShotExample,
    PromptExample,
    Scoring,
    TaskSplits,
    check_scoring,
    encode_examples,
    label_word_ids,
    load_task,
    option_ids,
    read_examples,
)
from adaptlab.data.kshot import MODES, UPSTREAM_SEEDS, PrepareConfig, generate_kshot, read_original
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
    shared_prompt_text,
    subset_by_subject,
    tokenize_prompts,
)
from adaptlab.data.offline import offline_splits, write_offline_kshot
from adaptlab.data.prompt_batches import collate_prompts, regression_metrics, task_metrics
from adaptlab.data.splits import kshot_split
from adaptlab.data.tasks import PAPER_TASKS, TASKS, FileLayout, Task, get_task, split_tasks
from adaptlab.data.templates import TemplatePart, check_template, parse_template

__all__ = [
    "LETTERS",
    "MAX_SHOTS",
    "MODES",
    "PAPER_TASKS",
    "SCORINGS",
    "TASKS",
    "UPSTREAM_SEEDS",
    "DataError",
    "FewShotExample",
    "FileLayout",
    "HeadlineExample",
    "HeadlineSplits",
    "MMLUExample",
    "MMLUSplits",
    "PrepareConfig",
    "PromptExample",
    "Task",
    "Scoring",
    "TaskSplits",
    "TemplatePart",
    "TokenizedPrompt",
    "answer_letter_ids",
    "build_prompt",
    "build_prompts",
    "build_train_text",
    "check_scoring",
    "check_template",
    "collate_prompts",
    "dataset_fingerprint",
    "encode_examples",
    "format_shot",
    "generate_kshot",
    "get_task",
    "group_by_subject",
    "header",
    "kshot_split",
    "label_word_ids",
    "load_index_mask",
    "load_headlines",
    "load_mmlu",
    "load_task",
    "offline_splits",
    "option_ids",
    "parse_template",
    "question_block",
    "read_examples",
    "read_original",
    "regression_metrics",
    "sample_weights",
    "select_shots",
    "shared_prompt_text",
    "split_tasks",
    "subset_by_subject",
    "task_metrics",
    "tokenize_prompts",
    "write_offline_kshot",
]

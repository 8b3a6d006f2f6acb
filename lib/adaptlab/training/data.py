"""A fine-tuning run's data: MMLU answer-only training or a few-shot task, and its evaluation.

:func:`mmlu_data` trains on MMLU questions (answer letter only) and evaluates on held-out ones;
:func:`task_data` trains on a few-shot task's k-shot split and evaluates on its dev and test
splits; :func:`multi_task_data` does so for several tasks at once (``task`` joined by ``+``).
All return a :class:`Data` the fine-tuning recipe runs without knowing which it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from accelerate import Accelerator

from adaptlab import data as mmlu
from adaptlab.data import split_tasks
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.extra_tests import encode_extra_tests
from adaptlab.training.fewshot import (
    FewShotData,
    collate_label_words,
    collate_options,
    evaluate_classification,
    model_kind,
    prepare_fewshot,
    scoring_parts,
    tag_task,
)
from adaptlab.training.loop import TRAIN_DATA, evaluate
from adaptlab.training.metrics import prediction_records
from adaptlab.training.objectives import OBJECTIVES


@dataclass
class Data:
    """What a run trains on and how it is evaluated."""

    train_items: list
    collate: Callable  # (items, pad_token_id) -> batch
    evaluate: Callable  # (model, accelerator) -> metrics of the evaluation (dev) set
    test: Callable | None  # (model, accelerator) -> test metrics, few-shot tasks only
    # single-task few-shot runs (``fewshot`` set): ``test`` and ``extra_tests`` also take
    # ``keep=True``, adding the per-example ``predictions`` (:func:`task_scores`)
    objective: Callable  # (model, batch) -> ObjectiveOutput
    identity: dict  # the rows and dataset that make a run this run
    record: dict  # what was loaded, for result.json
    summary: str  # "N training / M evaluation questions"
    fewshot: FewShotData | None = None  # the encoded task (single-task few-shot runs)
    tasks: tuple[str, ...] = ()  # multi-task runs: the tasks whose metrics sit under their names
    # extra_test_tasks: task -> (model, accelerator) -> metrics of its test split
    extra_tests: dict[str, Callable] = field(default_factory=dict)


def select(
    examples: list,
    n_rows: int,
    mask_path: str | None,
    samples_per_subject: int | None,
    seed: int,
    subjects: list[str] | None,
) -> list:
    """Rows of ``examples`` in an index mask over the ``n_rows`` split, then per-subject subset."""
    if mask_path:
        keep = set(mmlu.load_index_mask(mask_path, n_rows).tolist())
        examples = [ex for ex in examples if ex.index in keep]
    if samples_per_subject:
        rows = mmlu.subset_by_subject(examples, samples_per_subject, seed, subjects)
        return [examples[i] for i in rows]
    if subjects:
        unknown = sorted(set(subjects) - {ex.subject for ex in examples})
        if unknown:
            raise mmlu.DataError(f"No questions of subject(s) {', '.join(unknown)} are left.")
        return [ex for ex in examples if ex.subject in set(subjects)]
    return list(examples)


def choose_data(cfg: FinetuneConfig) -> tuple[list, list, list | None, dict]:
    """Training and evaluation questions, disjoint whenever they come from one split."""

    def load_split(split: str) -> mmlu.MMLUSplits:  # the shot pool is never trained on or evaluated
        return mmlu.load_mmlu(cfg.dataset_path, split=split, holdout_per_subject=cfg.shot_pool_size)

    eval_splits = load_split(cfg.eval_split)
    same = cfg.train_split == cfg.eval_split
    train_splits = eval_splits if same else load_split(cfg.train_split)
    split = train_splits.test
    evals = select(
        eval_splits.test,
        len(eval_splits.test),
        cfg.eval_mask_path,
        cfg.eval_samples_per_subject,
        cfg.eval_seed,
        cfg.subjects,
    )
    held_out = {ex.index for ex in evals} if same else set()
    if cfg.train_exclude_samples_per_subject:
        n, seed = cfg.train_exclude_samples_per_subject, cfg.train_exclude_seed
        held_out |= {split[i].index for i in mmlu.subset_by_subject(split, n, seed, cfg.subjects)}
    pool = [ex for ex in split if ex.index not in held_out]
    train = select(
        pool,
        len(split),
        cfg.train_mask_path,
        cfg.train_samples_per_subject,
        cfg.train_seed,
        cfg.subjects,
    )
    overlap = sorted({ex.index for ex in train} & held_out)
    if overlap:  # a guard: the pool above already excludes these rows
        raise mmlu.DataError(f"Training rows {overlap[:5]} are also held out; report this bug.")
    if not train or not evals:
        raise mmlu.DataError(
            f"The data options leave {len(train)} training and {len(evals)} evaluation questions; "
            "loosen the subset, mask or exclusion options."
        )
    record = {
        "train": {"split": cfg.train_split, "n": len(train), "rows": [ex.index for ex in train]},
        "eval": {"split": cfg.eval_split, "n": len(evals), "rows": [ex.index for ex in evals]},
        "held_out_of_training": sorted(held_out),
        "provenance": train_splits.provenance,
    }
    return train, evals, eval_splits.dev, record


def mmlu_data(cfg: FinetuneConfig, tokenizer: object) -> Data:
    """Answer-only MMLU training items and the evaluation prompts."""
    train, evals, shots, record = choose_data(cfg)
    items = TRAIN_DATA[cfg.objective].encode(train, tokenizer, cfg.max_seq_len, cfg.weighted_loss)
    prompts = mmlu.tokenize_prompts(
        evals, shots, tokenizer, cfg.eval_num_shots, cfg.eval_seed, cfg.max_seq_len
    )
    letter_ids = mmlu.answer_letter_ids(tokenizer)
    return Data(
        train_items=items,
        collate=TRAIN_DATA[cfg.objective].collator(cfg.packing, cfg.max_seq_len),
        evaluate=lambda model, acc: evaluate(
            model,
            prompts,
            letter_ids,
            tokenizer,
            acc,
            cfg.eval_batch_size,
            progress=cfg.progress and acc.is_main_process,
        ),
        test=None,
        objective=partial(OBJECTIVES[cfg.objective], label_smoothing=cfg.label_smoothing),
        identity={
            "rows": {"train": record["train"]["rows"], "eval": record["eval"]["rows"]},
            "dataset": record["provenance"].get("sha256"),
        },
        record=record,
        summary=f"{len(items)} training / {len(prompts)} evaluation questions",
    )


def split_name(cfg: FinetuneConfig) -> str:
    """How the run's summary names its data: ``16-shot (seed 42)`` or ``full data``."""
    return "full data" if cfg.kshot_mode == "full" else f"{cfg.shots}-shot (seed {cfg.data_seed})"


def encode_task(cfg: FinetuneConfig, task: str, tokenizer: object, config: object) -> FewShotData:
    """One few-shot task's k-shot split, encoded with its prompt and the run's data options."""
    return prepare_fewshot(
        task,
        tokenizer,
        model_kind(config, encoder_ok=cfg.head == "linear"),
        data_dir=cfg.task_dir,
        k=cfg.shots,
        seed=cfg.data_seed,
        mode=cfg.kshot_mode,
        template=cfg.template,
        label_words=cfg.label_words,
        max_length=cfg.task_max_len,
        test_limit=cfg.test_limit,
        head=cfg.head,
        scoring=cfg.scoring,
    )


def task_objective(cfg: FinetuneConfig) -> Callable:
    """The few-shot objective (label words, options or linear head) with the run's loss (CE,
    or MSE to the one-hot label)."""
    return partial(OBJECTIVES[cfg.objective], loss="mse" if cfg.l2_loss else "ce")


def task_scores(
    cfg: FinetuneConfig,
    data: FewShotData,
    pad: int,
    objective: Callable,
    examples: list,
    model: torch.nn.Module,
    acc: Accelerator,
    keep: bool = False,
) -> dict:
    """Metrics of ``examples`` of one task, scored with that task's label words or options.

    With ``keep`` a classification task's metrics also carry ``predictions``, one record per
    example in input order (:func:`~adaptlab.training.metrics.prediction_records`), for the
    recipe to write to disk; the regression task (STS-B) keeps none.
    """
    metrics = evaluate_classification(
        model,
        examples,
        data,
        acc,
        cfg.eval_batch_size,
        pad,
        objective,
        progress=cfg.progress and acc.is_main_process,
    )
    logits = metrics.pop("logits")
    if keep and data.task.regression is None:
        metrics["predictions"] = prediction_records(logits, [ex["label"] for ex in examples])
    return metrics


def task_data(cfg: FinetuneConfig, tokenizer: object, config: object) -> Data:
    """A few-shot task's k-shot split, encoded with its prompt; dev evaluates, test reports."""
    data = encode_task(cfg, cfg.task, tokenizer, config)
    pad = tokenizer.pad_token_id
    objective = task_objective(cfg)
    scores = partial(task_scores, cfg, data, pad, objective)
    extra, extra_sources = encode_extra_tests(cfg, data.task, tokenizer, data.kind)
    # the extra tasks' files join the identity only when there are some (older runs keep theirs)
    extra_identity = {"extra_tests": extra_sources} if extra else {}
    record = {**data.record, **extra_identity}
    return Data(
        train_items=data.train,
        collate=scoring_parts(data)[1],
        evaluate=partial(scores, data.dev),
        test=partial(scores, data.test),
        objective=objective,
        identity={
            "rows": {"train": [ex["guid"] for ex in data.train]},
            "dataset": data.record,
            **extra_identity,
        },
        record=record,
        summary=(
            f"{data.task.name} {split_name(cfg)}: {len(data.train)} training / "
            f"{len(data.dev)} dev / {len(data.test)} test examples"
            + "".join(f" + {len(ex)} {name} test" for name, ex in extra.items())
        ),
        fewshot=data,
        extra_tests={name: partial(scores, examples) for name, examples in extra.items()},
    )


def multi_task_data(cfg: FinetuneConfig, tokenizer: object, config: object) -> Data:
    """Several few-shot tasks (``cfg.task`` joined by ``+``) trained as one set (graft.md §8).

    The training examples of all tasks are concatenated, each with its own task's prompt and
    ``label_word_ids``, so a batch mixes tasks (``label_word_ids`` ``[B, C]``). Dev and test
    score each task with its own label words: ``{task: metrics, ...}`` plus ``accuracy``,
    ``loss`` and ``ece``, the means over tasks (``accuracy`` is what best-dev selection reads).
    """
    tasks = [encode_task(cfg, name, tokenizer, config) for name in split_tasks(cfg.task)]
    pad = tokenizer.pad_token_id
    objective = task_objective(cfg)

    def scores(split: str, model: torch.nn.Module, acc: Accelerator) -> dict:
        per_task = {
            data.task.name: task_scores(cfg, data, pad, objective, getattr(data, split), model, acc)
            for data in tasks
        }
        means = {
            key: sum(metrics[key] for metrics in per_task.values()) / len(per_task)
            for key in ("accuracy", "loss", "ece")
        }
        return {**per_task, **means}

    counts = {
        data.task.name: {"train": len(data.train), "dev": len(data.dev), "test": len(data.test)}
        for data in tasks
    }
    record = {
        "task": cfg.task,
        "n": counts,
        "tasks": {data.task.name: data.record for data in tasks},
    }
    train = [ex for data in tasks for ex in tag_task(data)]
    n_dev, n_test = (sum(n[split] for n in counts.values()) for split in ("dev", "test"))
    per_task = ", ".join(f"{name} {n['train']}" for name, n in counts.items())
    return Data(
        train_items=train,
        # each item's own label_word_ids ([B, C]) or options
        collate=collate_options if cfg.scoring == "options" else collate_label_words,
        evaluate=partial(scores, "dev"),
        test=partial(scores, "test"),
        objective=objective,
        identity={
            "rows": {"train": [f"{ex['task']}/{ex['guid']}" for ex in train]},
            "dataset": record["tasks"],
        },
        record=record,
        summary=(
            f"{cfg.task} {split_name(cfg)}: {len(train)} training "
            f"({per_task}) / {n_dev} dev / {n_test} test examples"
        ),
        tasks=tuple(counts),
    )

"""Extra test tasks of a few-shot fine-tuning run, e.g. MNLI mismatched (peft_methods.md §10).

ViLoRA's GLUE recipe selects MNLI on the matched dev set and also reports the mismatched one.
``extra_test_tasks: [mnli-mm]`` scores the test split of each named task with the run's own
prompt, label words, length limit, head and tokenizer, by the best-dev weights (at each new
best, as the run's own test split) and by the final ones. ``glue_mnli.yaml`` sets it::

    python scripts/finetune.py --config scripts/configs/vilora/base.yaml \
        --config scripts/configs/vilora/glue_mnli.yaml \
        --config scripts/configs/vilora/budget_r2.yaml

``result.json`` then holds ``metrics.extra_tests["mnli-mm"] = {"final": {...}, "at_best":
{...}}``, the same metrics as ``test_final``. An extra task reads its test split from
``task_dir`` with the run's ``kshot_mode``, ``shots``, ``data_seed`` and ``test_limit`` (for
``mnli-mm`` in ``full`` mode: ``MNLI/dev_mismatched.tsv``); it must have the run task's labels
and number of sentences, since its examples are read as the run's task. Each extra split costs
one evaluation pass at every new best and one at the end; its loader reads all of the task's
files (``mnli-mm``: also ``MNLI/train.tsv``) but only the test split is encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adaptlab.data import PromptExample, encode_examples, load_task
from adaptlab.training.errors import TrainingError


@dataclass
class ExtraTestSettings:
    """Extra test splits scored at the end of a single-task few-shot run.

    Args:
        extra_test_tasks: few-shot tasks of ``adaptlab.data.TASKS`` whose test split is
            encoded as the run's task and scored by the final and the best-dev weights
            (``metrics.extra_tests[task]``), e.g. ``[mnli-mm]`` for an MNLI run; each needs
            the run task's labels and number of sentences (empty: none).
    """

    extra_test_tasks: list[str] = field(default_factory=list)

    def _resolve_extra_tests(self) -> None:
        """Check the extra tasks against the run's task and spell them as registered."""
        from adaptlab.data import DataError, get_task, split_tasks
        from adaptlab.training.generation import GENERATION_TASKS

        if not self.extra_test_tasks:
            return
        task = getattr(self, "task", "")
        if task == "mmlu" or task in GENERATION_TASKS:
            raise TrainingError(
                f"extra_test_tasks applies to few-shot classification tasks, not task={task!r}; "
                "drop it."
            )
        if len(split_tasks(task)) > 1:
            raise TrainingError(
                f"extra_test_tasks applies to a single-task run, not task={task!r}; score the "
                "extra tasks in a run of one task."
            )
        run = get_task(task)
        names = []
        for name in self.extra_test_tasks:
            if name == "mmlu" or name in GENERATION_TASKS:
                raise TrainingError(
                    f"extra_test_tasks names {name!r}, which is not a few-shot classification "
                    "task; name tasks of adaptlab.data.TASKS."
                )
            try:
                extra = get_task(name)
            except DataError as err:
                raise TrainingError(f"extra_test_tasks: {err}") from None
            if extra.name == run.name or extra.name in names:
                raise TrainingError(
                    f"extra_test_tasks names {extra.name} twice or as the run's own task (whose "
                    "test split is scored anyway); name each other task once."
                )
            if set(extra.labels) != set(run.labels) or extra.n_sentences != run.n_sentences:
                raise TrainingError(
                    f"extra_test_tasks: {extra.name} has labels {list(extra.labels)} and "
                    f"{extra.n_sentences} sentence(s) per example, but task {run.name} has "
                    f"{list(run.labels)} and {run.n_sentences}; name tasks with the run's labels "
                    "and sentences."
                )
            names.append(extra.name)
        self.extra_test_tasks = names


def encode_extra_tests(
    cfg: Any, run_task: Any, tokenizer: Any, kind: str
) -> tuple[dict[str, list[PromptExample]], dict[str, dict]]:
    """The extra tasks' test examples encoded as the run's task.

    Args:
        cfg: the run's ``FinetuneConfig`` (extra tasks, data options, template, words, head).
        run_task: the run's :class:`adaptlab.data.Task` (its prompt, words and limits encode).
        tokenizer: the run's tokenizer.
        kind: ``masked`` or ``causal``, as the run's prompts.

    Returns:
        ``({task: [M] encoded test examples}, {task: provenance of the files read})``.
    """
    examples, provenance = {}, {}
    for name in cfg.extra_test_tasks:
        splits = load_task(
            name,
            cfg.task_dir,
            k=cfg.shots,
            seed=cfg.data_seed,
            mode=cfg.kshot_mode,
            test_limit=cfg.test_limit,
        )
        examples[name] = encode_examples(
            splits.test,
            run_task,
            tokenizer,
            kind=kind,
            head=cfg.head,
            template=cfg.template,
            label_words=cfg.label_words,
            max_length=cfg.task_max_len,
            scoring=cfg.scoring,
        )
        provenance[name] = splits.provenance
    return examples, provenance


def extra_test_metrics(final: dict[str, dict], best: dict | None) -> dict[str, Any]:
    """``{"extra_tests": {task: {"final": ..., "at_best": ...}}}`` for ``result.json``'s
    metrics (empty without extra tasks); ``best`` is the run's best record."""
    if not final:
        return {}
    at_best = (best or {}).get("extra_tests", {})
    return {
        "extra_tests": {
            task: {"final": metrics, "at_best": at_best.get(task)}
            for task, metrics in final.items()
        }
    }


def extra_test_summary(metrics: dict[str, Any], key: str) -> str:
    """``", mnli-mm test accuracy 0.812 (final) 0.815 (at the best dev step)"`` per extra task."""
    parts = []
    for task, scores in metrics.get("extra_tests", {}).items():
        final, best = scores["final"] or {}, scores["at_best"] or {}
        parts.append(
            f", {task} test {key} {final.get(key, float('nan')):.3f} (final) "
            f"{best.get(key, float('nan')):.3f} (at the best dev step)"
        )
    return "".join(parts)

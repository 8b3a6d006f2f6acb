"""Batches and metrics of encoded few-shot prompts (:mod:`adaptlab.data.fewshot`'s examples).

batch = collate_prompts(encoded[:8], tokenizer.pad_token_id, label_word_ids(task, tokenizer))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptlab.data.errors import DataError
from adaptlab.data.fewshot import PromptExample
from adaptlab.data.tasks import Task, get_task


def collate_prompts(
    examples: Sequence[PromptExample],
    pad_token_id: int,
    label_word_ids: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch.

    Args:
        examples: ``[B]`` encoded examples.
        pad_token_id: id written after each sequence.
        label_word_ids: ``[C]`` label-word ids to include (optional).

    Returns:
        ``input_ids`` and ``attention_mask`` ``[B, T]`` (long, T = longest example),
        ``positions`` and ``class_labels`` ``[B]`` (long), ``label_word_ids`` ``[C]``
        (long) when given, and ``target_scores`` ``[B]`` (float32) when the examples carry a
        regression ``score``.

    Raises:
        DataError: no examples.
    """
    if not examples:
        raise DataError("collate_prompts got no examples; pass at least one.")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "positions": torch.tensor([ex["position"] for ex in examples], dtype=torch.long),
        "class_labels": torch.tensor([ex["label"] for ex in examples], dtype=torch.long),
    }
    if all("score" in ex for ex in examples):
        batch["target_scores"] = torch.tensor([ex["score"] for ex in examples])
    if label_word_ids is not None:
        batch["label_word_ids"] = torch.tensor(list(label_word_ids), dtype=torch.long)
    return batch


def task_metrics(
    task: Task | str, predictions: Sequence[int], labels: Sequence[int]
) -> dict[str, float]:
    """The task's metrics of predicted vs gold class indices.

    ``acc`` always; ``f1`` (positive class = index 1) for MRPC / QQP; ``mcc`` (Matthews) for
    CoLA, computed with scikit-learn.

    Args:
        task: the task or its name.
        predictions: ``[M]`` predicted class indices.
        labels: ``[M]`` gold class indices.

    Returns:
        Metric name -> value.

    Raises:
        DataError: empty or unequal-length inputs.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task) if isinstance(task, str) else task
    if len(predictions) != len(labels) or not len(labels):
        raise DataError(
            f"task_metrics got {len(predictions)} predictions and {len(labels)} labels; pass "
            "one prediction per labelled example (at least one)."
        )
    preds, gold = [int(p) for p in predictions], [int(y) for y in labels]
    scores = {"acc": float(accuracy_score(gold, preds))}
    if "f1" in spec.metrics:
        scores["f1"] = float(f1_score(gold, preds, pos_label=1, zero_division=0))
    if "mcc" in spec.metrics:
        scores["mcc"] = float(matthews_corrcoef(gold, preds))
    return scores


def regression_metrics(predictions: Sequence[float], scores: Sequence[float]) -> dict[str, float]:
    """GLUE's STS-B metrics of predicted vs gold scores (:data:`~adaptlab.data.tasks.
    REGRESSION_METRICS`): ``pearson`` and ``spearman`` (``scipy.stats``) and ``corr``, their
    mean. A constant prediction has no correlation: NaN, as scipy gives.

    >>> regression_metrics([0.0, 1.0, 3.0], [0.5, 1.0, 2.0])["spearman"]
    1.0

    Raises:
        DataError: fewer than two pairs, or unequal lengths.
    """
    import warnings

    from scipy.stats import pearsonr, spearmanr

    if len(predictions) != len(scores) or len(scores) < 2:
        raise DataError(
            f"regression_metrics got {len(predictions)} predictions and {len(scores)} scores; "
            "pass one prediction per scored example (at least two)."
        )
    preds, gold = [float(p) for p in predictions], [float(y) for y in scores]
    with warnings.catch_warnings():  # a constant input warns and gives NaN: reported as NaN
        warnings.simplefilter("ignore")
        pearson = float(pearsonr(preds, gold)[0])
        spearman = float(spearmanr(preds, gold)[0])
    return {"pearson": pearson, "spearman": spearman, "corr": (pearson + spearman) / 2}

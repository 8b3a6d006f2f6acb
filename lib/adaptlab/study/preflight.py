"""Checks of a planned study before any stage runs: the task, and each method on the model."""

from __future__ import annotations

from collections.abc import Sequence

from adaptlab.errors import UserError
from adaptlab.study.plan import Stage, parsed_config


def check_task(task: str) -> None:
    """A study compares classifiers: refuse a regression, generation or unknown task.

    Raises:
        UserError: the task is not a few-shot classification task.
    """
    from adaptlab.data import get_task
    from adaptlab.data.errors import DataError

    try:
        spec = get_task(task)
    except DataError as err:
        raise UserError(f"task={task}: {err}") from None
    if spec.regression is not None:
        raise UserError(
            f"task={task} is a regression task; a study compares classifiers (accuracy, "
            "macro-F1, calibration): pick a classification task."
        )


def check_stages(stages: Sequence[Stage], model: str) -> None:
    """Each fine-tuning method against the model's architecture and its run length (one stage
    per method: the seeds change neither), from the model's config alone.

    Raises:
        UserError: a method the model does not support, naming both.
    """
    from adaptlab.models import model_skeleton
    from adaptlab.training.methods import check_method

    skeleton = model_skeleton(model)
    seen = set()
    for stage in stages:
        if stage.recipe != "finetune" or stage.method in seen:
            continue
        seen.add(stage.method)
        cfg = parsed_config("finetune", stage.argv)
        try:
            check_method(cfg, skeleton, cfg.max_steps or 1000)
        except UserError as err:  # TrainingError, AdapterError
            message = f"The study method {stage.method} cannot run on {model}: {err}"
            raise UserError(message) from None

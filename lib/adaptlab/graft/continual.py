"""Grafting after sequential fine-tuning (graft.md §8, "continual learning"; protocol unverified).

A model fine-tuned on task A (θ_A, from θ_pre) and then on task B (θ_AB, from θ_A) forgets
part of A. With g_A, A's graft learned from (θ_pre, θ_A), two models probe where A's skill sat:

- θ_AB with A's graft restored: θ_AB, except at the positions of g_A, which take θ_A's values
  (:func:`restore_graft`); does putting back A's few weights undo the forgetting, and what
  does it cost on B?
- A's graft alone: θ_pre + g_A ⊙ Δ_A (:func:`adaptlab.graft.merge_graft` on θ_pre).

:func:`task_data` rebuilds a fine-tuning run's few-shot data from its recorded config, so every
model is scored on the same test split the run was, by :func:`test_scores`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from adaptlab.graft.artefact import GraftMask
from adaptlab.graft.errors import GraftError
from adaptlab.training.fewshot import FewShotData, evaluate_classification, prepare_fewshot

RUN_DATA = {  # prepare_fewshot argument -> fine-tuning run config field
    "data_dir": "task_dir",
    "k": "shots",
    "seed": "data_seed",
    "mode": "kshot_mode",
    "template": "template",
    "label_words": "label_words",
    "test_limit": "test_limit",
    "max_length": "task_max_len",
}


@torch.no_grad()
def restore_graft(model: nn.Module, donor: Mapping[str, Tensor], mask: GraftMask) -> int:
    """Set ``model``'s weights at the mask's positions to ``donor``'s values, in place.

    Args:
        model: θ_AB (the model after fine-tuning on B).
        donor: name -> θ_A tensor for every tensor the mask covers (shaped like the parameter).
        mask: g_A, A's graft learned from (θ_pre, θ_A).

    Returns:
        How many entries changed value (at most ``mask.n_grafted``).

    Raises:
        GraftError: a mask tensor the model or the donor lacks, or another shape.
    """
    params = dict(model.named_parameters())
    changed = 0
    for name in mask.names:
        if name not in params or name not in donor:
            raise GraftError(
                f"{name!r} of the graft mask is missing from the model or from θ_A; restore a "
                "mask learned on the same architecture."
            )
        p, source = params[name], donor[name]
        if tuple(source.shape) != tuple(p.shape):
            raise GraftError(
                f"{name!r} is {tuple(p.shape)} in the model but {tuple(source.shape)} in θ_A."
            )
        flat = p.data.view(-1)
        index = mask.index[name].to(p.device)
        values = source.reshape(-1)[index.to(source.device)].to(p.device, p.dtype)
        changed += int((flat[index] != values).sum())
        flat[index] = values
    return changed


def task_data(run_config: Mapping[str, Any], tokenizer: Any, kind: str) -> FewShotData:
    """The few-shot data a fine-tuning run trained and was tested on, from its recorded config."""
    options = {ours: run_config.get(theirs) for ours, theirs in RUN_DATA.items()}
    options = {key: value for key, value in options.items() if value is not None}
    return prepare_fewshot(run_config["task"], tokenizer, kind, **options)


def test_scores(
    model: nn.Module, data: FewShotData, accelerator: Any, batch_size: int, pad_token_id: int
) -> dict[str, float]:
    """Accuracy, the task's other metrics and ECE of ``model`` on ``data``'s test split."""
    metrics = evaluate_classification(model, data.test, data, accelerator, batch_size, pad_token_id)
    return {k: v for k, v in metrics.items() if k not in ("logits", "loss")}

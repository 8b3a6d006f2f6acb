"""Typed configuration of ``scripts/graft_study.py`` (the grafting experiments of the paper).

Every field is documented in the class docstring; presets live in ``scripts/configs/graft_study_*``
and any field can be overridden on the command line::

    python scripts/graft_study.py --config scripts/configs/graft_study_demo.yaml \
        --sparsities '[1e-4,1e-3]'

The study runs ``scripts/finetune.py`` and ``scripts/graft.py`` with the presets it names; the
fine-tuning and grafting settings live there, the study says only which runs to make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from adaptlab.graft.errors import GraftError

EXPERIMENTS = ("sweep", "overlap", "continual")
"""What the study can run, in the order it runs them."""


@dataclass
class GraftStudyConfig:
    """The grafting experiments of Panigrahi et al. 2023: accuracy and calibration against graft
    size (learned vs top-|Δ| masks), multi-task mask overlap, and grafting after sequential
    fine-tuning.

    Args:
        experiments: which to run: ``sweep`` (grafts of one fine-tuning run at every sparsity,
            learned and top-|Δ|), ``overlap`` (one mask per task, their asymmetric overlap),
            ``continual`` (fine-tune A then B, restore A's graft).
        model: θ_pre, passed to every fine-tuning run (None: the fine-tuning preset's).
        task: the sweep's task (a key of ``adaptlab.data.TASKS``).
        task_dir: the k-shot data root of every task (None: the fine-tuning preset's; offline
            tasks need none).
        finetune_preset: YAML preset of ``scripts/finetune.py`` every fine-tuning run starts
            from (freezing flags, optimiser, steps, data split); the study sets the task,
            model and output folder.
        graft_preset: YAML preset of ``scripts/graft.py`` every graft starts from (η, β,
            mask steps, batches); the study sets the run, sparsity, mask steps of the top-|Δ|
            grafts (0) and output folder.
        sparsities: the sweep's sparsities s (k = ⌊s·N_E⌋ entries in the base patch).
        reference_sparsity: the sparsity of the overlap and continual masks and of the
            study's ``result.json`` / ``reliability.json`` (None: the middle of
            ``sparsities``).
        ood_tasks: tasks whose test splits every graft of ``task`` is also evaluated on (same
            labels as ``task``; None: the graft preset's); grafts of other tasks use none.
        overlap_tasks: the tasks of the overlap experiment (two or more).
        multitask: how the overlap masks are made: ``joint`` (one run fine-tuned on all tasks
            at once, ``--task a+b``, as in the paper; the tasks need the same number of
            labels), ``separate`` (one run per task), ``auto`` (joint where the fine-tuning
            recipe accepts a joint task, else separate).
        continual_tasks: ``[A, B]``: fine-tune on A from θ_pre, then on B from A's weights.
        save_restored: keep θ_AB with A's graft restored as a model folder
            (``continual/restored``, the size of the model).
        progress: show the recipes' progress bars.
        output_dir: the study folder (runs, JSON records, figures, ``report.md``); running
            the same command again reuses every finished run in it.
    """

    experiments: list[Literal["sweep", "overlap", "continual"]] = field(
        default_factory=lambda: list(EXPERIMENTS)
    )
    model: str | None = None
    task: str = "SST-2"
    task_dir: str | None = None
    finetune_preset: str = "scripts/configs/finetune_graft_paper.yaml"
    graft_preset: str = "scripts/configs/graft_paper.yaml"
    sparsities: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3])
    reference_sparsity: float | None = None
    ood_tasks: list[str] | None = None
    overlap_tasks: list[str] = field(default_factory=lambda: ["SST-2", "cr", "mr", "QNLI"])
    multitask: Literal["auto", "joint", "separate"] = "auto"
    continual_tasks: list[str] = field(default_factory=lambda: ["SST-2", "QNLI"])
    save_restored: bool = True
    progress: bool = False
    output_dir: str = "results/graft_study"

    def __post_init__(self) -> None:
        from adaptlab.data import get_task  # unknown tasks fail here, named as registered

        self.task = get_task(self.task).name
        self.overlap_tasks = [get_task(t).name for t in self.overlap_tasks]
        self.continual_tasks = [get_task(t).name for t in self.continual_tasks]
        if self.ood_tasks is not None:
            self.ood_tasks = [get_task(t).name for t in self.ood_tasks]
        self.sparsities = sorted(float(s) for s in self.sparsities)
        checks = [
            (bool(self.experiments), f"experiments is empty; pick from {list(EXPERIMENTS)}."),
            (
                bool(self.sparsities)
                and all(math.isfinite(s) and 0.0 < s <= 1.0 for s in self.sparsities),
                f"sparsities={self.sparsities}: give one or more fractions in (0, 1] "
                "(the paper uses 1e-5 to 1e-4).",
            ),
            (
                len(set(self.sparsities)) == len(self.sparsities),
                f"sparsities={self.sparsities} repeats a value; give each once.",
            ),
            (
                self.reference_sparsity is None or self.reference_sparsity in self.sparsities,
                f"reference_sparsity={self.reference_sparsity} is not one of sparsities="
                f"{self.sparsities}; pick one of them (it reuses that sweep run).",
            ),
            (
                "overlap" not in self.experiments
                or len(set(self.overlap_tasks)) == len(self.overlap_tasks) >= 2,
                f"overlap_tasks={self.overlap_tasks}: give two or more different tasks.",
            ),
            (
                "continual" not in self.experiments
                or (len(self.continual_tasks) == 2 and len(set(self.continual_tasks)) == 2),
                f"continual_tasks={self.continual_tasks}: give two different tasks, [A, B].",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise GraftError(message)
        if self.reference_sparsity is None:
            self.reference_sparsity = self.sparsities[len(self.sparsities) // 2]
        for name in ("finetune_preset", "graft_preset"):
            if not Path(getattr(self, name)).is_file():
                raise GraftError(
                    f"{name}={getattr(self, name)} does not exist; pass a YAML preset from "
                    "scripts/configs/ (run from the repository root)."
                )

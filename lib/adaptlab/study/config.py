"""Typed configuration of ``scripts/study.py``: one task, one model, every adaptation method.

Presets live in ``scripts/configs/study_*.yaml``; every field can be overridden on the command
line (``--methods '[lora,graft]' --seeds '[13]'``). The study says only which runs to make: the
fine-tuning, grafting and kernel settings live in the presets of those recipes, which it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StudyConfig:
    """How in-context learning, fine-tuning, PEFT and grafting compare on one model and task.

    Args:
        model: the pretrained model every stage starts from (a hub id, a folder or an
            embedded model such as ``embedded:smollm2-135m``).
        task: a few-shot classification task (a key of ``adaptlab.data.TASKS``, e.g. the
            offline ``tweet-sentiment``).
        task_dir: the k-shot data root of an LM-BFF task (None: offline tasks need none).
        shots: training examples per class (the k of the k-shot split).
        test_limit: a seeded sample of the test split, the same rows in every stage (None: all).
        seeds: the seeds; each is the data seed of the k-shot split and the training seed of
            every run of that split (the report gives mean ± std over them).
        methods: adaptation methods to compare, keys of
            :data:`adaptlab.study.plan.METHODS` (``graft`` grafts the ``full`` run, which is
            then made even when ``full`` is not listed).
        finetune_preset: YAML preset of ``scripts/finetune.py`` every fine-tuning run starts
            from (optimiser, steps, batches, evaluation).
        method_flags: per method, flags of ``scripts/finetune.py`` (or ``scripts/graft.py`` for
            ``graft``) that override the preset, e.g. ``{lora: [--lr, "1e-3"]}``.
        graft_preset: YAML preset of ``scripts/graft.py`` (the study sets the run and folder).
        kernel: compute the eNTK of the pretrained model (``scripts/compute_kernel.py``) and
            compare its predictions with every fine-tuning method.
        kernel_preset: YAML preset of ``scripts/compute_kernel.py``.
        base_task: forgetting and representations on the base task: the pretrained model and
            every method's run (its weights at the reported test step; a graft's mask) are
            extracted 0-shot on MMLU (``scripts/extract_repr.py``, ``extract_preset``) and
            analysed layer by layer against the pretrained run (``scripts/analyze_repr.py``,
            ``analyze_preset``): MMLU accuracy and its drop, intrinsic dimension, ARI with the
            subjects and neighbourhood overlap with the pretrained representation per layer.
        extract_preset: YAML preset of ``scripts/extract_repr.py`` (subjects, sample, points).
        analyze_preset: YAML preset of ``scripts/analyze_repr.py`` (point, layers, metrics).
        mmlu_path: MMLU as a local file for the extractions (None: the embedded MMLU test set).
        output_dir: the study folder: ``stages/`` holds each recipe's own output folder,
            ``records/`` what made each, and ``study.json`` / ``report.md`` the results.
        rerun_changed: rerun a stage whose cached output was made by another config (its
            folder is replaced); without it such a stage stops the study before anything runs.
        progress: show the recipes' progress bars.
        only: run just the stages whose names match one of these shell patterns (e.g.
            ``'finetune/*'``, ``kernel``), as one job of a SLURM array does; the report is
            written once every stage has finished. None: every stage.
        list_stages: print the stage names in run order and stop (nothing runs).
    """

    model: str = "embedded:smollm2-135m"
    task: str = "tweet-sentiment"
    task_dir: str | None = None
    shots: int = 16
    test_limit: int | None = 100
    seeds: list[int] = field(default_factory=lambda: [13, 21, 42])
    methods: list[str] = field(default_factory=lambda: ["full", "lora", "graft"])
    finetune_preset: str = "scripts/configs/finetune_fewshot_demo.yaml"
    method_flags: dict[str, list[str]] = field(default_factory=dict)
    graft_preset: str = "scripts/configs/graft_demo.yaml"
    kernel: bool = True
    kernel_preset: str = "scripts/configs/kernel_demo.yaml"
    base_task: bool = True
    extract_preset: str = "scripts/configs/extract_demo.yaml"
    analyze_preset: str = "scripts/configs/analyze_demo.yaml"
    mmlu_path: str | None = None
    output_dir: str = "results/study"
    rerun_changed: bool = False
    progress: bool = False
    only: list[str] | None = None
    list_stages: bool = False

    def __post_init__(self) -> None:
        if self.shots < 1:
            raise ValueError(f"shots={self.shots} must be at least 1 (examples per class).")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be distinct and at least one.")
        if self.test_limit is not None and self.test_limit < 1:
            raise ValueError(f"test_limit={self.test_limit} must be at least 1 (or null: all).")
        presets = [self.finetune_preset, self.graft_preset]
        presets += [self.kernel_preset] if self.kernel else []
        presets += [self.extract_preset, self.analyze_preset] if self.base_task else []
        for preset in presets:
            if not Path(preset).is_file():
                raise ValueError(f"The preset {preset} does not exist; pass an existing YAML.")

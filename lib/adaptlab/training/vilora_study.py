"""The offline ViLoRA study (peft_methods.md §10 on the embedded models): its typed config, the
methods it compares and the statistics of its report.

``scripts/vilora_study.py`` runs ``scripts/finetune.py`` once per (model, method, seed) and reads
back each run's ``result.json`` and final ``adapter_config.json``; everything here works on
those numbers, so it is tested without training anything::

    python scripts/vilora_study.py --config scripts/configs/vilora_study_demo.yaml

The question the study asks is the paper's: does the magnitude |μ| of IVON's posterior mean
carry AdaLoRA's importance signal (``mean`` ≈ ``SNR``) while σ alone does not (``sigma`` worse)?
Seeds are paired (every method of a model sees the same data and the same seed), so the
report compares criteria by paired differences, and by how many rank-1 triplets two criteria
keep in common (the Jaccard index of their final rank patterns). ``vilora_random`` (random
scores, same budget schedule) is the control: a criterion that does no better than it carries
no signal at this scale, whatever its mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from adaptlab.errors import UserError

IVON_FLAGS = ["--method", "adalora", "--optimizer", "ivon"]
"""What every IVON-trained AdaLoRA run shares (its learning rate and IVON settings come from the
model preset's ``ivon_args``)."""

STUDY_METHODS: dict[str, list[str]] = {
    "full": ["--method", "full", "--optimizer", "adamw"],
    "lora": ["--method", "lora", "--optimizer", "adamw"],
    "adalora_adam": ["--method", "adalora", "--optimizer", "adamw"],
    "adalora_ivon": [*IVON_FLAGS, "--vilora_criterion", "sensitivity"],
    **{
        f"vilora_{name}": [*IVON_FLAGS, "--vilora_criterion", name]
        for name in ("SNR_mean_abs", "SNR", "mean", "sigma", "E_mean_abs", "random")
    },
}
"""The study's methods as ``scripts/finetune.py`` flags, added after the model's preset."""

IVON_METHODS = frozenset(name for name, flags in STUDY_METHODS.items() if "ivon" in flags)
ADAM_KINDS = {"full": "full_args", "lora": "lora_args", "adalora_adam": "lora_args"}
"""Which per-model flag list each Adam method adds (learning rates differ by method)."""

PAIRS = (
    ("vilora_mean", "vilora_SNR"),
    ("vilora_sigma", "vilora_SNR"),
    ("vilora_SNR_mean_abs", "vilora_random"),
    ("vilora_SNR", "vilora_random"),
    ("vilora_mean", "vilora_random"),
    ("vilora_sigma", "vilora_random"),
    ("vilora_SNR_mean_abs", "adalora_ivon"),
    ("adalora_ivon", "adalora_adam"),
    ("adalora_ivon", "ivon_head_only"),
    ("vilora_SNR_mean_abs", "ivon_head_only"),
    *(
        (f"vilora_{a}_b2", f"vilora_{b}_b2")
        for a, b in (("mean", "SNR"), ("sigma", "SNR"), ("SNR", "random"), ("mean", "random"))
    ),
)
"""Paired differences the report tests (first minus second, per seed). ``ivon_head_only`` and
the ``_b2`` runs are controls a model may add (``StudyModel.controls``): IVON training the head
alone (do the adapters matter at all?), and ViLoRA with a β2 at which h moves within the run."""


@dataclass
class StudyModel:
    """One model of the study: its fine-tuning preset and the flags each kind of run adds.

    Args:
        preset: YAML preset of ``scripts/finetune.py`` shared by every run of this model (task,
            steps, batch, targets, AdaLoRA budget).
        full_args: flags of the full fine-tuning run (its learning rate).
        lora_args: flags of the LoRA and AdaLoRA + Adam runs.
        ivon_args: flags of every IVON run (learning rate, ``ivon_*``).
        methods: this model's methods (None: the study's ``methods``), e.g. fewer for a model
            whose runs are slow.
        controls: this model's extra runs, name -> ``finetune.py`` flags (after the preset and
            ``ivon_args``, or ``lora_args`` when the flags do not select IVON), e.g. a head-only
            IVON run, or ViLoRA with another ``ivon_beta2``; reported like the methods.
    """

    preset: str
    full_args: list[str | int | float] = field(default_factory=list)
    lora_args: list[str | int | float] = field(default_factory=list)
    ivon_args: list[str | int | float] = field(default_factory=list)
    methods: list[str] | None = None
    controls: dict[str, list[str | int | float]] = field(default_factory=dict)

    def runs(self, default: Sequence[str]) -> list[str]:
        """The names of this model's runs: its methods (or ``default``), then its controls."""
        return [*(self.methods or default), *self.controls]

    def flags(self, name: str) -> list[str]:
        """The flags a method or control adds after the preset, learning rate included."""
        if name in self.controls:
            own = [str(v) for v in self.controls[name]]
            pairs = zip(own, own[1:], strict=False)
            ivon = any(a == "--optimizer" and b.startswith("ivon") for a, b in pairs)
            return [*map(str, self.ivon_args if ivon else self.lora_args), *own]
        kind = "ivon_args" if name in IVON_METHODS else ADAM_KINDS[name]
        return [*STUDY_METHODS[name], *map(str, getattr(self, kind))]


@dataclass
class ViLoRAStudyConfig:
    """Full FT, LoRA, AdaLoRA + Adam, AdaLoRA + IVON (sensitivity) and ViLoRA with every criterion,
    over paired seeds, on offline tasks.

    Args:
        models: name -> :class:`StudyModel` (e.g. ``encoder``: the embedded MiniLM-L6 with a
            linear head; ``decoder``: the embedded SmolLM2-135M with label words).
        methods: keys of ``STUDY_METHODS`` to run, in this order.
        seeds: training seeds; every method of a model runs each one (paired comparisons).
        workers: runs at a time, each a process with cpu_count // workers threads.
        output_dir: the study folder: ``runs/<model>/<method>/seed_<s>/``, ``summary.json``,
            ``report.md``. A study started again reuses every finished run.
        extra_args: flags added to every run (e.g. ``[--max_steps, 4]`` for a smoke test).
    """

    models: dict[str, StudyModel] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(STUDY_METHODS))
    seeds: list[int] = field(default_factory=lambda: [2021, 2022, 2023, 2024, 2025])
    workers: int = 1
    output_dir: str = "results/vilora_study"
    extra_args: list[str | int | float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.models = {
            name: m if isinstance(m, StudyModel) else StudyModel(**m)
            for name, m in self.models.items()
        }
        named = [*self.methods, *(m for model in self.models.values() for m in model.methods or [])]
        unknown = [m for m in named if m not in STUDY_METHODS]
        clashes = [
            c for model in self.models.values() for c in model.controls if c in STUDY_METHODS
        ]
        if clashes:
            raise UserError(f"Control(s) {', '.join(clashes)} reuse a method's name; rename them.")
        if unknown:
            raise UserError(
                f"Unknown study method(s) {', '.join(unknown)}; choose from "
                f"{', '.join(STUDY_METHODS)}."
            )
        if not self.models:
            raise UserError("The study names no models; give models: {name: {preset: ...}}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds={self.seeds} must be a non-empty list of distinct seeds.")
        if self.workers < 1:
            raise UserError(f"workers={self.workers} must be at least 1.")


def run_args(
    model: StudyModel, method: str, seed: int, out: str, extra: Sequence[Any]
) -> list[str]:
    """The ``scripts/finetune.py`` argv of one run (``method``: a method or a control)."""
    return [
        "--config", model.preset, *model.flags(method),
        "--seed", str(seed), "--output_dir", out, *map(str, extra),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` (std with ddof 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": n}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any] | None:
    """Per-seed differences a − b over the seeds both have: mean, std, n and the two-sided
    p-value of the paired t-test (``scipy.stats.ttest_rel``; None when all differences are
    equal). None when fewer than two seeds are shared."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    stats = mean_std(diffs)
    p = None
    if stats["std"] > 0:
        from scipy.stats import ttest_rel

        p = float(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    return {**stats, "p_value": p, "seeds": seeds}


def kept_triplets(rank_pattern: Mapping[str, Sequence[bool]]) -> set[tuple[str, int]]:
    """The (module, index) of every rank-1 triplet a final AdaLoRA rank pattern keeps."""
    return {(name, i) for name, keep in rank_pattern.items() for i, k in enumerate(keep) if k}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (1 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def pattern_agreement(
    patterns: Mapping[str, Mapping[int, Mapping[str, Sequence[bool]]]],
) -> dict[str, dict[str, float]]:
    """Mean over shared seeds of the Jaccard index of two methods' kept triplets.

    Args:
        patterns: method -> seed -> final rank pattern.

    Returns:
        ``"a|b"`` -> ``{"jaccard", "n"}`` for every pair of methods with shared seeds.
    """
    out = {}
    for a, b in combinations(sorted(patterns), 2):
        seeds = sorted(set(patterns[a]) & set(patterns[b]))
        if seeds:
            values = [
                jaccard(kept_triplets(patterns[a][s]), kept_triplets(patterns[b][s])) for s in seeds
            ]
            out[f"{a}|{b}"] = {"jaccard": sum(values) / len(values), "n": len(values)}
    return out


def claim_verdict(
    pairs: Mapping[str, dict[str, Any] | None], alpha: float = 0.05, suffix: str = ""
) -> str:
    """One sentence on the paper's claim (``mean`` ≈ ``SNR``, ``sigma`` worse) from the paired
    differences ``pairs["vilora_mean{suffix}-vilora_SNR{suffix}"]`` and
    ``pairs["vilora_sigma{suffix}-vilora_SNR{suffix}"]``."""
    same = pairs.get(f"vilora_mean{suffix}-vilora_SNR{suffix}")
    worse = pairs.get(f"vilora_sigma{suffix}-vilora_SNR{suffix}")
    if same is None or worse is None:
        return "not tested: the study lacks paired mean, SNR and sigma runs."

    def significant(d: dict[str, Any]) -> bool:
        return d["p_value"] is not None and d["p_value"] < alpha

    first = (
        f"mean − SNR = {same['mean']:+.3f} ± {same['std']:.3f} "
        f"({'a significant' if significant(same) else 'no significant'} difference"
    )
    second = (
        f"sigma − SNR = {worse['mean']:+.3f} ± {worse['std']:.3f} "
        f"({'significantly ' if significant(worse) else 'not significantly '}"
        f"{'worse' if worse['mean'] < 0 else 'better or equal'}"
    )
    holds = not significant(same) and significant(worse) and worse["mean"] < 0
    return (
        f"{first}, paired t-test at α={alpha}); {second}): the claim "
        f"{'holds' if holds else 'does not hold'} here."
    )

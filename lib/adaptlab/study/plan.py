"""The stages of a study: which recipe runs with which arguments into which folder.

Each stage is one call of an existing recipe (``scripts/finetune.py``, ``scripts/graft.py``,
``scripts/compute_kernel.py``), exactly as a user would type it. Its identity is the hash of
the recipe's own parsed config (the presets read and every flag applied, minus the output
folder and display options) and of the stages it reads: a changed preset line, flag or upstream
stage changes the hash; a moved study folder does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptlab.config import parse_config, to_dict
from adaptlab.errors import UserError
from adaptlab.study.config import StudyConfig
from adaptlab.training.checkpoint import fingerprint


@dataclass(frozen=True)
class StudyMethod:
    """An adaptation method of the study.

    Attributes:
        recipe: the recipe that makes its run (``finetune`` or ``graft``).
        flags: the recipe's flags that select the method (before the study's
            ``method_flags``).
        needs: the method whose run it reads (``graft``: the ``full`` fine-tuning run).
    """

    recipe: str
    flags: tuple[str, ...]
    needs: str | None = None


METHODS: dict[str, StudyMethod] = {
    # full fine-tuning of the blocks, head and embeddings frozen (the run grafting reads)
    "full": StudyMethod(
        "finetune", ("--method", "full", "--fix_head", "true", "--fix_embeddings", "true")
    ),
    "lora": StudyMethod("finetune", ("--method", "lora")),
    "adalora": StudyMethod("finetune", ("--method", "adalora")),
    "vilora": StudyMethod(
        "finetune",
        ("--method", "adalora", "--optimizer", "ivon", "--vilora_criterion", "SNR_mean_abs"),
    ),
    "inducer": StudyMethod("finetune", ("--method", "inducer")),
    "kernel_mix": StudyMethod("finetune", ("--method", "kernel_mix")),
    "graft": StudyMethod("graft", (), needs="full"),
}
"""The methods a study compares, by name."""

RECIPE_CONFIGS = {
    "finetune": ("adaptlab.training.config", "FinetuneConfig"),
    "graft": ("adaptlab.graft.config", "GraftConfig"),
    "compute_kernel": ("adaptlab.ntk.config", "KernelConfig"),
    "extract_repr": ("adaptlab.extract.config", "ExtractConfig"),
    "analyze_repr": ("adaptlab.geometry.study", "AnalyzeConfig"),
}
"""Each recipe's config class (module, name): the stage hash is taken over its parsed fields."""

DONE_MARKERS = {
    "finetune": "result.json",
    "graft": "result.json",
    "compute_kernel": "result.json",
    "extract_repr": "manifest.json",
    "analyze_repr": "analysis_manifest.json",
}
"""The file each recipe writes last: its run has finished when it exists."""

OVERWRITE_FLAGS = {
    "finetune": "--overwrite",
    "graft": "--overwrite",
    "compute_kernel": "--overwrite_kernels",
    "extract_repr": "--overwrite",
}
"""The flag that makes a recipe replace an earlier run in its folder (analysis always does)."""

UPSTREAM_FIELDS = {"graft": "finetuned", "extract_repr": "model", "analyze_repr": "runs"}
"""Config fields naming another stage's folder: left out of the hash (the stage's own hash
stands for it), so moving the study folder keeps every stage cached."""

DISPLAY_FIELDS = frozenset(
    {"output_dir", "overwrite", "progress", "report_to", "run_name", "wandb_project", "log_every"}
)
"""Config fields that do not change a stage's results (left out of its hash)."""


@dataclass
class Stage:
    """One recipe call.

    Attributes:
        name: ``{kind}/{method}/seed{seed}``, ``kernel``, ``extract/{run}`` or ``analysis``;
            also its folder under ``stages/``.
        recipe: a key of :data:`RECIPE_CONFIGS`.
        argv: the recipe's arguments, the output folder last.
        folder: the recipe's output folder.
        config: the recipe's parsed config (JSON-ready), without :data:`DISPLAY_FIELDS`.
        needs: names of the stages whose outputs it reads.
        method: the study method it makes (None for the kernel).
        seed: its seed (None for the kernel, which covers every seed).
        hash: sha256 of the recipe, ``config`` and the hashes of ``needs``.
    """

    name: str
    recipe: str
    argv: list[str]
    folder: Path
    config: dict[str, Any]
    needs: list[str]
    method: str | None
    seed: int | None
    hash: str = ""


def parsed_config(recipe: str, argv: Sequence[str]) -> Any:
    """The recipe's config from ``argv`` (its presets read), as the recipe itself parses it.

    Raises:
        SystemExit: a bad flag or value (the recipe's own one-line error, exit status 2).
    """
    import importlib

    module, name = RECIPE_CONFIGS[recipe]
    return parse_config(getattr(importlib.import_module(module), name), list(argv))


def _identity(recipe: str, argv: Sequence[str]) -> dict[str, Any]:
    config = to_dict(parsed_config(recipe, argv))
    return {k: v for k, v in config.items() if k not in DISPLAY_FIELDS}


def _data_flags(cfg: StudyConfig, seed: int) -> list[str]:
    flags = ["--task", cfg.task, "--shots", str(cfg.shots), "--data_seed", str(seed)]
    flags += ["--test_limit", "null" if cfg.test_limit is None else str(cfg.test_limit)]
    return flags + ([] if cfg.task_dir is None else ["--task_dir", cfg.task_dir])


def check_methods(cfg: StudyConfig) -> list[str]:
    """The methods to run, in :data:`METHODS` order, with the ones they need added.

    Raises:
        UserError: an unknown method name, in ``methods`` or ``method_flags``.
    """
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise UserError(f"Unknown study method {unknown[0]!r}; choose from {', '.join(METHODS)}.")
    stray = sorted(set(cfg.method_flags) - set(METHODS))
    if stray:  # flags of a method not run this time are kept for later; a typo is not
        raise UserError(
            f"method_flags names {stray[0]!r}, which is no study method; choose from "
            f"{', '.join(METHODS)}."
        )
    wanted = set(cfg.methods)
    wanted |= {METHODS[m].needs for m in cfg.methods if METHODS[m].needs}
    return [m for m in METHODS if m in wanted]


def plan(cfg: StudyConfig, out: Path) -> list[Stage]:
    """Every stage of the study in run order (a stage after those it reads), hashes set.

    Raises:
        UserError: see :func:`check_methods`.
        SystemExit: a recipe refuses a stage's flags (its own one-line error).
    """
    stages: dict[str, Stage] = {}
    for method in check_methods(cfg):
        spec = METHODS[method]
        for seed in cfg.seeds:
            name = f"{spec.recipe}/{method}/seed{seed}"
            folder = out / "stages" / name
            extra = list(cfg.method_flags.get(method, []))
            if spec.recipe == "finetune":
                argv = ["--config", cfg.finetune_preset, "--model", cfg.model]
                argv += _data_flags(cfg, seed) + ["--seed", str(seed), *spec.flags, *extra]
                needs: list[str] = []
            else:  # graft: the run of the method it needs, same seed
                source = stages[f"finetune/{spec.needs}/seed{seed}"]
                argv = ["--config", cfg.graft_preset, "--finetuned", str(source.folder)]
                test = "null" if cfg.test_limit is None else str(cfg.test_limit)
                argv += ["--test_limit", test, *extra]
                needs = [source.name]
            argv += ["--progress", str(cfg.progress).lower(), "--output_dir", str(folder)]
            stages[name] = Stage(name, spec.recipe, argv, folder, {}, needs, method, seed)
    if cfg.kernel:
        folder = out / "stages" / "kernel"
        argv = ["--config", cfg.kernel_preset, "--model", cfg.model, "--task", cfg.task]
        argv += ["--shots", str(cfg.shots), "--seeds", f"[{','.join(map(str, cfg.seeds))}]"]
        test = "null" if cfg.test_limit is None else str(cfg.test_limit)
        argv += ["--test_limit", test]
        argv += [] if cfg.task_dir is None else ["--task_dir", cfg.task_dir]
        argv += ["--progress", str(cfg.progress).lower(), "--output_dir", str(folder)]
        stages["kernel"] = Stage("kernel", "compute_kernel", argv, folder, {}, [], None, None)
    if cfg.base_task:
        _base_task_stages(cfg, out, stages)
    for stage in stages.values():
        stage.config = _identity(stage.recipe, stage.argv)
        if stage.needs:  # the upstream stages' hashes stand for their folders
            stage.config.pop(UPSTREAM_FIELDS[stage.recipe], None)
        identity = {"recipe": stage.recipe, "config": stage.config}
        identity["needs"] = [stages[n].hash for n in stage.needs]
        stage.hash = fingerprint(identity)
    return list(stages.values())


def _base_task_stages(cfg: StudyConfig, out: Path, stages: dict[str, Stage]) -> None:
    """Add the MMLU extraction of the pretrained model and of every run (fine-tuning at its
    reported test step, graft as its mask), then their analysis against the pretrained one."""
    runs = [s for s in stages.values() if s.recipe in ("finetune", "graft")]
    extracts = []
    for source in [None, *runs]:
        name = "pretrained" if source is None else f"{source.method}-seed{source.seed}"
        folder = out / "stages" / "extract" / name
        if source is None:
            model, needs = cfg.model, []
        elif source.recipe == "graft":
            model, needs = str(source.folder / "mask"), [source.name]
        else:  # the weights whose test numbers the study reports
            evaluated = parsed_config("finetune", source.argv).eval_points > 0
            model = str(source.folder / ("best" if evaluated else "final"))
            needs = [source.name]
        argv = ["--config", cfg.extract_preset, "--model", model, "--num_shots", "0"]
        argv += [] if cfg.mmlu_path is None else ["--dataset_path", cfg.mmlu_path]
        argv += ["--output_dir", str(folder)]
        method = None if source is None else source.method
        seed = None if source is None else source.seed
        stage = Stage(f"extract/{name}", "extract_repr", argv, folder, {}, needs, method, seed)
        stages[stage.name] = stage
        extracts.append(stage)
    folder = out / "stages" / "analysis"
    runs_flag = "[" + ",".join(str(stage.folder) for stage in extracts) + "]"
    argv = ["--config", cfg.analyze_preset, "--runs", runs_flag, "--reference", "pretrained"]
    argv += ["--plot", "false", "--progress", str(cfg.progress).lower()]
    argv += ["--output_dir", str(folder)]
    needs = [stage.name for stage in extracts]
    stages["analysis"] = Stage("analysis", "analyze_repr", argv, folder, {}, needs, None, None)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The config keys whose values differ (added and removed keys included), sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def replace_folder(stage: Stage) -> Stage:
    """``stage`` with the flag that makes its recipe replace the folder's old run instead of
    refusing it (:data:`OVERWRITE_FLAGS`; the analysis always replaces its own)."""
    flag = OVERWRITE_FLAGS.get(stage.recipe)
    if flag is None:
        return stage
    argv = [*stage.argv[:-2], flag, "true", *stage.argv[-2:]]
    return dataclasses.replace(stage, argv=argv)

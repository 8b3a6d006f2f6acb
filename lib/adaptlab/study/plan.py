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
}
"""Each recipe's config class (module, name): the stage hash is taken over its parsed fields."""

DISPLAY_FIELDS = frozenset(
    {"output_dir", "overwrite", "progress", "report_to", "run_name", "wandb_project", "log_every"}
)
"""Config fields that do not change a stage's results (left out of its hash)."""


@dataclass
class Stage:
    """One recipe call.

    Attributes:
        name: ``{kind}/{method}/seed{seed}`` or ``kernel``; also its folder under ``stages/``.
        recipe: ``finetune``, ``graft`` or ``compute_kernel``.
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
    for stage in stages.values():
        stage.config = _identity(stage.recipe, stage.argv)
        if stage.recipe == "graft":
            stage.config.pop("finetuned", None)  # the upstream stage's hash stands for it
        identity = {"recipe": stage.recipe, "config": stage.config}
        identity["needs"] = [stages[n].hash for n in stage.needs]
        stage.hash = fingerprint(identity)
    return list(stages.values())


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The config keys whose values differ (added and removed keys included), sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def replace_folder(stage: Stage) -> Stage:
    """``stage`` with the flag that makes its recipe replace the folder's old run instead of
    refusing it (``--overwrite``; the kernel recipe: ``--overwrite_kernels``)."""
    flag = "--overwrite_kernels" if stage.recipe == "compute_kernel" else "--overwrite"
    argv = [*stage.argv[:-2], flag, "true", *stage.argv[-2:]]
    return dataclasses.replace(stage, argv=argv)

"""Running a study's stages with a cache: ``records/<stage>.json`` says what made each stage
folder (the recipe, its argv, the config hash, the config, its seconds). One file per stage, so
stages run as separate jobs (a SLURM array) never write the same file.

A stage whose recorded hash equals its planned hash and whose recipe finished (the file it
writes last exists: ``plan.DONE_MARKERS``) is skipped. One that was made by another config
stops the study before anything runs (naming the stage and the changed keys), unless
``rerun_changed``: then its recipe replaces the folder. A stage that never finished is run
again and resumes where its recipe left it (each recipe resumes its own runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adaptlab.errors import UserError
from adaptlab.io import read_json, write_json
from adaptlab.study.plan import DONE_MARKERS, Stage, changed_keys, replace_folder
from adaptlab.telemetry import now

RECORDS = "records"

Runner = Callable[[str, list[str]], None]
"""``(recipe name, argv)``: runs ``scripts/<recipe>.py`` with ``argv``."""


def record_path(out: Path, name: str) -> Path:
    """Where the record of stage ``name`` lives."""
    return out / RECORDS / f"{name}.json"


def read_stages(out: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The records of the stages ``names`` that have one."""
    paths = {name: record_path(out, name) for name in names}
    return {name: read_json(path) for name, path in paths.items() if path.is_file()}


def check_cache(stages: Sequence[Stage], recorded: dict[str, dict[str, Any]], rerun: bool) -> set:
    """The names of the stages whose folder holds another config's run.

    Raises:
        UserError: such a stage without ``rerun`` (the first named, with its changed keys).
    """
    changed = {s.name for s in stages if s.name in recorded and recorded[s.name]["hash"] != s.hash}
    if changed and not rerun:
        first = next(s for s in stages if s.name in changed)
        keys = changed_keys(recorded[first.name]["config"], first.config)
        what = f"changed: {', '.join(keys)}" if keys else "a stage it reads changed"
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise UserError(
            f"The cached stage {first.name}{more} was made by another config ({what}); pass "
            "--rerun_changed true to rerun it (its folder is replaced), or a new --output_dir."
        )
    return changed


def is_cached(stage: Stage, recorded: dict[str, dict[str, Any]]) -> bool:
    """Whether ``stage`` finished with its planned config."""
    entry = recorded.get(stage.name)
    return (
        entry is not None
        and entry["hash"] == stage.hash
        and (stage.folder / DONE_MARKERS[stage.recipe]).is_file()
    )


def run_stages(
    stages: Sequence[Stage],
    out: Path,
    runner: Runner,
    rerun: set,
    say: Callable[[str], None] = print,
) -> None:
    """Run every stage of ``stages`` that is not cached, writing its record when it ends.

    A record holds the stage's recipe, argv, hash, config, folder (relative to ``out``),
    ``seconds`` (its last run) and ``finished``.

    Raises:
        UserError: a recipe failed (its own message is above).
    """
    recorded = read_stages(out, [stage.name for stage in stages])
    for index, stage in enumerate(stages, 1):
        if is_cached(stage, recorded):
            say(f"[{index}/{len(stages)}] {stage.name}: cached")
            continue
        say(f"[{index}/{len(stages)}] {stage.name}: scripts/{stage.recipe}.py")
        argv = replace_folder(stage).argv if stage.name in rerun else stage.argv
        started = time.perf_counter()
        try:
            runner(stage.recipe, argv)
        except SystemExit as stop:
            if stop.code not in (None, 0):
                raise UserError(
                    f"The stage {stage.name} (scripts/{stage.recipe}.py) failed with exit "
                    f"status {stop.code}; its message is above. Fix that and run the study "
                    "again: finished stages are reused."
                ) from None
        marker = DONE_MARKERS[stage.recipe]
        if not (stage.folder / marker).is_file():
            raise UserError(
                f"The stage {stage.name} ended without its {marker}; run the study again to "
                "resume it."
            )
        record = {
            "recipe": stage.recipe,
            "argv": stage.argv,
            "hash": stage.hash,
            "config": stage.config,
            "folder": str(stage.folder.relative_to(out)),
            "seconds": round(time.perf_counter() - started, 3),
            "finished": now(),
        }
        path = record_path(out, stage.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)

"""The recipes in ``scripts/`` as modules, for recipes that run other recipes in-process
(``scripts/study.py``, ``scripts/graft_study.py``, ``scripts/demo.py``): each is called through
its ``main(argv)``, exactly as ``python scripts/<name>.py ARGV`` would run it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_recipe(scripts: Path, name: str) -> ModuleType:
    """``scripts/<name>.py`` as the module ``scripts_<name>`` (loaded once per process; the
    scripts folder is not a package)."""
    module_name = f"scripts_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, scripts / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run_recipe(scripts: Path, name: str, argv: list[str]) -> None:
    """Run ``scripts/<name>.py`` with ``argv`` in this process, as its own process would: the
    output-folder locks it leaves held (a finished or failed run) are released when it returns.

    Raises:
        SystemExit: the recipe's own exit (status 2 with its one-line error).
    """
    from adaptlab.rundir import held_locks, release_locks_since

    before = held_locks()
    try:
        load_recipe(scripts, name).main(argv)
    finally:
        release_locks_since(before)

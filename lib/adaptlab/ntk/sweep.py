"""Solver hyper-parameter sweep and gather, as upstream's sweep plus ``tools/gather_result.py``.

Kernels are computed once per data seed; every grid point re-fits a solver on the train-train
kernel (cheap next to the kernel) and predicts dev and test. Per data seed the point with the
best dev metric is chosen and the test metric is reported as mean (std) ×100 over seeds.

Choices where upstream is implicit:

- Ties of the dev metric go to the first point in grid order (upstream: the first run in
  ``output_dir`` order).
- The std is the population std (``np.std``, ddof = 0), as upstream's gather prints it.
- Grid points are every combination of the values given, in the order of the keys, the last key
  varying fastest (``itertools.product``). Settings a solver does not read (``gamma`` for
  ``lstsq``) still make separate points; they tie and the first wins.

Quick start::

    from adaptlab.ntk.io import KernelSet
    from adaptlab.ntk.sweep import run_sweep, write_sweep

    record = run_sweep(
        {seed: KernelSet.load(f"kernels/SST-2/16-{seed}", "sst-2") for seed in (13, 21, 42)},
        {"regularization": [0.0, 1e-3, 1e-2], "f0_scaling": [0.0]},
        solver_names=["lstsq", "logistic"],
    )
    write_sweep("sweep.json", record)
    print(record["summary"]["test_mean"], record["summary"]["test_std"])
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from adaptlab.io import write_json
from adaptlab.ntk.errors import KernelError
from adaptlab.ntk.io import KernelSet
from adaptlab.ntk.solvers import SolveResult, SolverSettings, check_request

GRID_KEYS = tuple(f.name for f in fields(SolverSettings))
DEFAULT_SOLVER = "logistic"  # upstream's --kernel_solver default


def expand_grid(grid: Mapping[str, Any]) -> list[SolverSettings]:
    """All combinations of the values of ``grid``, as settings, in grid order.

    Args:
        grid: setting name -> list of values; names are :class:`SolverSettings` fields
            (``solver``, ``regularization``, ``f0_scaling``, ``gamma``, ``lam``, ``svr_c``,
            ``svr_epsilon``). A single value stands for a one-element list.

    Returns:
        One :class:`SolverSettings` per combination, the last key varying fastest.

    Raises:
        KernelError: an unknown key, an empty list or an invalid value.
    """
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise KernelError(f"Unknown sweep key(s) {unknown}; use some of {list(GRID_KEYS)}.")
    axes = {}
    for key, values in grid.items():
        values = list(values) if isinstance(values, list | tuple) else [values]
        if not values:
            raise KernelError(f"Sweep key {key!r} has no values; give at least one.")
        axes[key] = values
    combos = itertools.product(*axes.values())
    return [SolverSettings(**dict(zip(axes, combo, strict=True))) for combo in combos]


def gather(trials: Sequence[Mapping[str, Any]], *, metric: str = "accuracy") -> dict[str, Any]:
    """Pick the best-dev trial per seed and summarise the test metric over seeds.

    Args:
        trials: one dict per (seed, grid point) with keys ``seed``, ``point`` (grid index),
            ``settings`` and ``dev`` / ``test`` (metric name -> value), in grid order.
        metric: the metric that selects (on dev) and is reported (on test).

    Returns:
        ``{"metric", "best": [per seed: seed, point, settings, dev, test], "summary": {n_seeds,
        test_mean, test_std, test_median, dev_mean, dev_std}}``; summary values are ×100,
        std over seeds with ddof = 0.

    Raises:
        KernelError: no trials, or a trial without the metric.
    """
    if not trials:
        raise KernelError("The sweep has no results to gather; give at least one seed and point.")
    best: dict[Any, Mapping[str, Any]] = {}
    for trial in trials:
        if metric not in trial["dev"] or metric not in trial["test"]:
            raise KernelError(
                f"Trial {trial['point']} of seed {trial['seed']} has no {metric!r}; pick one of "
                f"{sorted(trial['dev'])}."
            )
        held = best.get(trial["seed"])
        if held is None or trial["dev"][metric] > held["dev"][metric]:  # ties: first one stays
            best[trial["seed"]] = trial
    dev = np.array([t["dev"][metric] for t in best.values()], dtype=np.float64)
    test = np.array([t["test"][metric] for t in best.values()], dtype=np.float64)
    return {
        "metric": metric,
        "best": [dict(t) for t in best.values()],
        "summary": {
            "n_seeds": len(best),
            "test_mean": float(test.mean() * 100),
            "test_std": float(test.std() * 100),
            "test_median": float(np.median(test) * 100),
            "dev_mean": float(dev.mean() * 100),
            "dev_std": float(dev.std() * 100),
        },
    }


def _points(
    grid: Mapping[str, Any] | Sequence[SolverSettings], solver_names: Sequence[str] | None
) -> list[SolverSettings]:
    """The grid points in order; the solver axis comes first (varies slowest)."""
    if not isinstance(grid, Mapping):
        if solver_names is not None:
            raise KernelError(
                "Explicit settings carry their own solver; pass a grid dict to add solver_names."
            )
        return [p if p.solver else replace(p, solver=DEFAULT_SOLVER) for p in grid]
    if solver_names is not None and "solver" in grid:
        raise KernelError("Give the solvers once: either solver_names or a 'solver' grid key.")
    solvers = grid.get("solver", list(solver_names or [DEFAULT_SOLVER]))
    return expand_grid({"solver": solvers, **{k: v for k, v in grid.items() if k != "solver"}})


def run_sweep(
    kernels_by_seed: Mapping[int, KernelSet],
    grid: Mapping[str, Any] | Sequence[SolverSettings],
    solver_names: Sequence[str] | None = None,
    *,
    dev_split: str = "dev",
    test_split: str = "test",
    metric: str = "accuracy",
    progress: bool = True,
    on_solve: Callable[[Any, int, Mapping[str, SolveResult]], None] | None = None,
) -> dict[str, Any]:
    """Solve every grid point on every seed's kernels and gather the results.

    Args:
        kernels_by_seed: data seed -> the kernels of that seed (train, dev and test).
        grid: setting name -> values (see :func:`expand_grid`), or explicit settings.
        solver_names: solvers to sweep, the first (slowest) axis of a dict grid; default
            upstream's ``logistic``.
        dev_split: split that selects the settings.
        test_split: split that is reported.
        metric: a :class:`~adaptlab.ntk.solvers.SolveResult` summary key, e.g. ``accuracy``.
        progress: show a progress bar.
        on_solve: called after each solve with ``(seed, point index, {split: SolveResult})``,
            e.g. to keep the per-example logits the JSON record leaves out.

    Returns:
        A JSON-ready record: ``points`` (the grid), ``trials`` (every seed × point with dev and
        test metrics), ``best`` and ``summary`` (see :func:`gather`), ``splits`` and
        ``seconds``.

    Raises:
        KernelError: a grid point that cannot run on some seed's kernels (checked for all
            before any solve), or missing splits.
    """
    if not kernels_by_seed:
        raise KernelError("No kernels to sweep over; give the kernels of at least one seed.")
    points = _points(grid, solver_names)
    for seed, kernels in kernels_by_seed.items():
        missing = [s for s in ("train", dev_split, test_split) if s not in kernels.kernels]
        if missing:
            raise KernelError(f"Seed {seed} has no kernels for {missing}; load those splits.")
        for point in points:
            check_request(
                point.solver,
                point,
                n_outputs=kernels.n_outputs,
                stacked=kernels.stacked,
                with_f0=bool(kernels.logits),
            )
    start = time.perf_counter()
    trials = []
    bar = tqdm(
        total=len(kernels_by_seed) * len(points),
        desc="solver sweep",
        unit="solve",
        disable=not progress,
    )
    with bar:
        for seed, kernels in kernels_by_seed.items():
            for index, point in enumerate(points):
                results = kernels.solve(point.solver, point, splits=(dev_split, test_split))
                if on_solve is not None:
                    on_solve(seed, index, results)
                trials.append(
                    {
                        "seed": seed,
                        "point": index,
                        "settings": asdict(point),
                        "dev": results[dev_split].summary(),
                        "test": results[test_split].summary(),
                    }
                )
                bar.update()
    record = {
        "points": [asdict(p) for p in points],
        "splits": {"dev": dev_split, "test": test_split},
        "trials": trials,
        **gather(trials, metric=metric),
        "seconds": time.perf_counter() - start,
    }
    return record


def write_sweep(path: str | Path, record: Mapping[str, Any]) -> None:
    """Write a sweep record as indented JSON, atomically."""
    write_json(path, record)

"""Read what ``scripts/extract_repr.py`` wrote: runs, their layers and per-example labels.

Quick start::

    run = open_run("results/demo/5shot")
    x = run.layer("norm1", 12)          # [N, hidden] float64
    run.labels()["subjects"]            # [N] subject of each row
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from adaptlab.errors import UserError
from adaptlab.extract.outputs import MANIFEST, STATISTICS
from adaptlab.io import read_json


@dataclass
class ExtractionRun:
    """One finished extraction folder.

    Attributes:
        name: folder name (e.g. ``5shot``), used as the run's label in tables and figures.
        path: the folder.
        manifest: its ``manifest.json``.
        statistics: its ``statistics.json``.
    """

    name: str
    path: Path
    manifest: dict
    statistics: dict

    @property
    def n_examples(self) -> int:
        return self.manifest["n_examples"]

    @property
    def rows(self) -> list[int]:
        """Dataset row of each example: equal lists mean the same examples in the same order."""
        return self.statistics["rows"]

    def entries(self, point: str | None = None) -> list[dict]:
        """Manifest layer entries (point, layer, file, shape), of one ``point`` if given."""
        return [e for e in self.manifest["layers"] if point is None or e["point"] == point]

    def layer(self, point: str, layer: int, dtype: torch.dtype = torch.float64) -> np.ndarray:
        """The ``[N, hidden]`` rows of ``point`` at label ``l{layer}``, as ``dtype``."""
        matches = [e for e in self.entries(point) if e["layer"] == layer]
        if not matches:
            have = ", ".join(f"{e['point']}/l{e['layer']}" for e in self.entries())
            raise UserError(f"{self.path} has no {point}/l{layer}; it holds {have}.")
        with safe_open(str(self.path / matches[0]["file"]), framework="pt") as f:
            return f.get_tensor("repr").to(dtype).numpy()

    def labels(self) -> dict[str, np.ndarray]:
        """Per-example labels: ``subjects`` and gold answer ``letters``, ``[N]`` each."""
        return {
            "subjects": np.asarray(self.statistics["subjects"]),
            "letters": np.asarray(self.statistics["answers"]),
        }


def open_run(path: str | Path) -> ExtractionRun:
    """Open a finished extraction folder (one holding ``manifest.json``)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UserError(
            f"{path} holds no finished extraction ({MANIFEST} is missing); run "
            "scripts/extract_repr.py first or let it finish."
        )
    return ExtractionRun(path.name, path, read_json(path / MANIFEST), read_json(path / STATISTICS))


def find_runs(folder: str | Path) -> list[ExtractionRun]:
    """Every finished run under ``folder`` (itself a run, or its parent), fewest shots first."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return [open_run(folder)]
    runs = [open_run(p) for p in sorted(folder.iterdir()) if (p / MANIFEST).is_file()]
    if not runs:
        raise UserError(f"No finished extraction run (manifest.json) under {folder}.")
    return sorted(runs, key=lambda r: (r.manifest["prompt"]["num_shots"], r.name))

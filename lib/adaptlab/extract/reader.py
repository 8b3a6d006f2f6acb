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
from safetensors import SafetensorError, safe_open

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
        with safe_open(str(_layer_path(self, matches[0])), framework="pt") as f:
            return f.get_tensor("repr").to(dtype).numpy()

    def labels(self) -> dict[str, np.ndarray]:
        """Per-example labels: ``subjects`` and gold answer ``letters``, ``[N]`` each."""
        return {
            "subjects": np.asarray(self.statistics["subjects"]),
            "letters": np.asarray(self.statistics["answers"]),
        }


def open_run(path: str | Path) -> ExtractionRun:
    """Open a finished extraction folder (one holding ``manifest.json``), checking its files.

    Every layer file the manifest names must lie inside the folder, exist and hold a ``repr``
    tensor of the recorded shape (only safetensors headers are read), so a damaged or foreign
    run fails here, in one sentence, before any analysis starts.

    Raises:
        UserError: a missing, corrupt or inconsistent manifest, statistics or layer file.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UserError(
            f"{path} holds no finished extraction ({MANIFEST} is missing); run "
            "scripts/extract_repr.py first or let it finish."
        )
    manifest = read_json(path / MANIFEST)
    missing = [k for k in _MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise UserError(
            f"{path / MANIFEST} is not an extraction manifest (no {', '.join(missing)}); pass "
            "a folder written by scripts/extract_repr.py."
        )
    if not (path / STATISTICS).is_file():
        raise UserError(
            f"{path} has a manifest but no {STATISTICS}; the run folder is incomplete: run the "
            "extraction again into a new folder."
        )
    statistics = read_json(path / STATISTICS)
    if (
        not isinstance(statistics, dict)
        or len(statistics.get("rows", ())) != manifest["n_examples"]
    ):
        raise UserError(
            f"{path / STATISTICS} does not describe the {manifest['n_examples']} rows of its "
            "manifest; the folder mixes two runs: extract again into a new folder."
        )
    run = ExtractionRun(path.name, path, manifest, statistics)
    for entry in run.entries():
        _check_layer_file(run, entry)
    return run


_MANIFEST_KEYS = ("n_examples", "n_layers", "layers", "prompt")


def _layer_path(run: ExtractionRun, entry: dict) -> Path:
    """The file of a manifest entry, refused when it points outside the run folder."""
    root = run.path.resolve()
    file = (root / str(entry.get("file", ""))).resolve()
    if root not in file.parents:
        raise UserError(
            f"{run.path / MANIFEST} names the layer file {entry.get('file')!r}, which lies "
            "outside the run folder; the manifest was altered: extract again."
        )
    return file


def _check_layer_file(run: ExtractionRun, entry: dict) -> None:
    file = _layer_path(run, entry)
    if not file.is_file():
        raise UserError(
            f"{run.path} is missing {entry['file']}, which its manifest lists; extract again into "
            "a new folder."
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            shape = list(f.get_slice("repr").get_shape())
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"{file} is not a readable safetensors file ({type(err).__name__}); it was truncated "
            "or damaged: extract again into a new folder."
        ) from None
    if "shape" in entry and shape != list(entry["shape"]):
        raise UserError(
            f"{file} holds a tensor of shape {shape}, but the manifest records {entry['shape']}; "
            "extract again into a new folder."
        )


def find_runs(folder: str | Path) -> list[ExtractionRun]:
    """Every finished run under ``folder`` (itself a run, or its parent), fewest shots first."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(
            f"{folder} does not exist; pass extraction folders written by "
            "scripts/extract_repr.py (or a folder holding them)."
        )
    if (folder / MANIFEST).is_file():
        return [open_run(folder)]
    if not folder.is_dir():
        raise UserError(f"{folder} is a file; pass an extraction folder (or a folder of them).")
    runs = [open_run(p) for p in sorted(folder.iterdir()) if (p / MANIFEST).is_file()]
    if not runs:
        raise UserError(f"No finished extraction run (manifest.json) under {folder}.")
    return sorted(runs, key=lambda r: (r.manifest["prompt"]["num_shots"], r.name))

"""The plotting notebooks run headless on real extraction outputs and draw what the files say."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from adaptlab.extract.reader import find_runs
from adaptlab.plotting.extraction import layer_norms
from tests.conftest import ROOT, extract_shot_runs


def test_plot_extraction_notebook(tiny_model_dir, mmlu_file, tmp_path):
    extract_shot_runs(tiny_model_dir, mmlu_file, tmp_path)
    runs = find_runs(tmp_path)
    assert [r.name for r in runs] == ["0shot", "1shot"]
    layers, norms = layer_norms(runs[1])
    assert layers == [0, 1]
    rows = load_file(tmp_path / "1shot" / "norm1" / "l1.safetensors")["repr"].astype(np.float64)
    assert np.isclose(norms[1], np.linalg.norm(rows, axis=1).mean())

    env = {**os.environ, "ADAPTLAB_RESULTS": str(tmp_path), "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "notebook" / "plot_extraction.py")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    acc = runs[0].manifest["accuracy"]["constrained_micro"]
    assert f"0shot: N={runs[0].manifest['n_examples']} accuracy A-D {acc:.3f}" in result.stdout
    assert (tmp_path / "figures" / "extraction.png").stat().st_size > 10_000


def _run_notebook(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "notebook" / name)],
        capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg", **env},
        timeout=300,
    )  # fmt: skip


def test_plot_graft_notebook(tmp_path):
    rng = np.random.default_rng(0)
    scores = {"base": 0.5, "finetuned": 0.9, "grafted": 0.85}
    result = {
        "n_eligible": 1000, "n_params": 1500, "n_grafted": 10,
        "fraction_eligible": 0.01, "fraction_all": 10 / 1500,
        "splits": {
            model: {s: {"accuracy": acc, "ece": 0.1} for s in ("train", "dev", "test")}
            for model, acc in scores.items()
        },
    }  # fmt: skip
    sweep = [
        {"kind": kind, "sparsity": s, "fraction_eligible": s, "accuracy": 0.6 + 0.1 * i}
        for kind in ("learned", "top_delta")
        for i, s in enumerate((1e-4, 1e-3, 1e-2))
    ]
    probs = rng.dirichlet(np.ones(3), size=40)
    reliability = {m: {"probs": probs.tolist(), "labels": [0, 1] * 20} for m in scores}
    overlap = {
        "tasks": ["a", "b"],
        "sizes": {"a": 2, "b": 0},
        "overlap": [[1.0, None], [0.0, None]],
    }
    files = {"result": result, "sweep": sweep, "reliability": reliability, "overlap": overlap}
    for name, data in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))

    run = _run_notebook("plot_graft.py", {"ADAPTLAB_GRAFT": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "graft: 10 of 1000 eligible parameters (1.000e-02; 6.667e-03 of all 1500)" in run.stdout
    assert "grafted    test      0.8500  0.1000" in run.stdout
    assert f"grafted/ft {0.85 / 0.9:.3f}, of the gain over base {0.35 / 0.4:.3f}" in run.stdout
    for figure in ("accuracy_vs_size", "reliability", "overlap"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 10_000

    for name in ("sweep", "reliability", "overlap"):
        (tmp_path / f"{name}.json").unlink()
    run = _run_notebook("plot_graft.py", {"ADAPTLAB_GRAFT": str(tmp_path),
                                          "ADAPTLAB_FIGURES": str(tmp_path / "bare")})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no sweep.json" in run.stdout and "no overlap.json" in run.stdout
    assert not (tmp_path / "bare").exists()

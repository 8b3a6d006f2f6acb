"""The plotting notebooks run headless on real extraction outputs and draw what the files say."""

from __future__ import annotations

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

"""scripts/analyze_repr.py on real extraction outputs of a tiny model, checked by hand."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from adaptlab.extract.reader import open_run
from tests.conftest import ROOT, extract_shot_runs, load_script, write_mmlu_jsonl

analyze_repr = load_script("analyze_repr")
SMALL = [
    "--metrics.maxk", "20", "--metrics.gride_range_max", "16", "--metrics.id_scale", "4",
    "--metrics.density_k", "4", "--metrics.overlap_k", "5", "--metrics.probe_folds", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = write_mmlu_jsonl(root / "mmlu.jsonl", per_subject=30, seed=1)
    return extract_shot_runs(tiny_model_dir, data, root)


@pytest.fixture(scope="module")
def analysis(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    analyze_repr.main(
        ["--runs", f"[{runs}]", "--output_dir", str(out), "--plot", "true", "--progress", "false"]
        + SMALL
    )
    return out, json.loads((out / "metrics.json").read_text())


def neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """k nearest neighbours of every row, self excluded (sklearn brute force)."""
    idx = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x).kneighbors(x)[1]
    return idx[:, 1:]


def test_one_record_per_run_and_layer(analysis):
    out, records = analysis
    keys = [(r["run"], r["point"], r["layer"]) for r in records]
    assert keys == [
        ("0shot", "norm1", 1), ("0shot", "final_norm", 2), ("0shot", "logits", 3),
        ("1shot", "norm1", 1), ("1shot", "final_norm", 2), ("1shot", "logits", 3),
    ]  # fmt: skip
    required = {
        "n", "id_twonn", "id_gride", "n_clusters", "core_fraction", "ari_subjects", "ari_letters",
        "overlap_subjects", "overlap_letters", "probe_subjects", "probe_letters",
    }  # fmt: skip
    assert all(required <= set(r) for r in records)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and float(rows[0]["id_twonn"]) == pytest.approx(
        records[0]["id_twonn"]
    )
    assert {p.name for p in (out / "figures").glob("*.png")} >= {
        "intrinsic_dimension.png", "ari.png", "clusters.png", "label_overlap.png",
    }  # fmt: skip


def test_label_overlap_matches_the_formula(runs, analysis):
    _, records = analysis
    run = open_run(runs / "1shot")
    x, subjects = run.layer("norm1", 1), run.labels()["subjects"]
    record = next(r for r in records if r["run"] == "1shot" and r["layer"] == 1)
    assert record["n"] == len(x) == 75 and record["n_duplicates"] == 0
    classes, counts = np.unique(subjects, return_counts=True)
    size = dict(zip(classes, counts, strict=True))
    k_i = np.array([max(1, int(0.3 * size[s])) for s in subjects])
    nn = neighbours(x, int(k_i.max()))
    chi = np.array([np.mean(subjects[nn[i, : k_i[i]]] == subjects[i]) for i in range(len(x))])
    inv = np.array([1 / size[s] for s in subjects])
    assert record["overlap_subjects"] == pytest.approx((chi * inv).sum() / inv.sum(), abs=1e-12)


def test_data_overlap_with_the_reference_run(runs, analysis):
    _, records = analysis
    a, b = (open_run(runs / name).layer("norm1", 1) for name in ("0shot", "1shot"))
    na, nb = neighbours(a, 5), neighbours(b, 5)
    expected = np.mean([len(set(na[i]) & set(nb[i])) / 5 for i in range(len(a))])
    record = next(r for r in records if r["run"] == "1shot" and r["layer"] == 1)
    assert record["reference"] == "0shot"
    assert record["overlap_reference"] == pytest.approx(expected, abs=1e-12)
    assert "overlap_reference" not in records[0]  # the reference itself


def test_landscape_notebook_runs_headless(analysis, tmp_path):
    out, records = analysis
    env = {
        **os.environ,
        "ADAPTLAB_METRICS": str(out / "metrics.json"),
        "ADAPTLAB_FIGURES": str(tmp_path),
        "ADAPTLAB_SMOOTHING": "1",
        "MPLBACKEND": "Agg",
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "notebook" / "plot_landscape.py")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(records)} records from 1 file(s)" in result.stdout
    assert (tmp_path / "landscape.png").stat().st_size > 10_000


def test_bad_inputs_are_one_line(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--runs", f"[{tmp_path / 'empty'}]"], "No finished extraction run"),
        (["--runs", f"[{runs / '0shot'}]", "--point", "norm2"], "has no 'norm2' layers"),
        (["--runs", f"[{runs / '0shot'}]", "--reference", "9shot"], "reference '9shot'"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            analyze_repr.main([*extra, "--output_dir", str(tmp_path / "out"), *SMALL])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_checkpoints_are_compared_with_the_reference(runs, tmp_path):
    import shutil

    ckpts = tmp_path / "ckpt"
    for step in (1, 4):  # stand-ins for log-spaced checkpoints: copies of the 0-shot run
        shutil.copytree(runs / "0shot", ckpts / f"step_{step}")
    out = tmp_path / "out"
    analyze_repr.main(
        [
            "--runs", f"[{runs / '0shot'},{runs / '1shot'}]", "--reference", "0shot",
            "--checkpoints", f"[{ckpts / 'step_1'},{ckpts / 'step_4'}]",
            "--output_dir", str(out), "--plot", "true", "--progress", "false",
            "--metrics.probe", "false", *SMALL,
        ]
    )  # fmt: skip
    records = json.loads((out / "metrics.json").read_text())
    ckpt = [r for r in records if r["kind"] == "checkpoint"]
    assert {r["run"] for r in ckpt} == {"step_1", "step_4"} and len(ckpt) == 6
    # a representation's neighbourhoods overlap their own copy exactly
    assert all(r["overlap_reference"] == pytest.approx(1.0) for r in ckpt)
    assert (out / "figures" / "checkpoint_overlap.png").stat().st_size > 10_000


def test_clipped_maxk_is_said_once_per_n_over_a_whole_study(runs, tmp_path, caplog, monkeypatch):
    from adaptlab.geometry import layer

    monkeypatch.setattr(layer, "_CLIPPED", set())  # what earlier tests reported
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="adaptlab.geometry.layer"):
        analyze_repr.main(["--runs", f"[{runs}]", "--output_dir", str(out), "--progress",
                           "false", *SMALL, "--metrics.maxk", "500"])  # fmt: skip
    records = json.loads((out / "metrics.json").read_text())
    used = {r["maxk"] for r in records}
    assert len(records) == 6 and max(used) < 500  # every layer clipped, each keeps its k
    assert len(used) < len(records)  # layers share an N, so fewer warnings than layers
    said = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert sorted(said) == sorted(
        f"maxk=500 clipped to N-1={k} (N unique points); said once per N." for k in used
    )

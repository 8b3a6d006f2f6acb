"""Graft analysis numbers against set arithmetic on random masks, and the graft figures."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest
import torch

from adaptlab.graft import analysis
from adaptlab.graft.analysis import (
    graft_size,
    graft_sizes,
    mask_indices,
    mask_overlap,
    overlap_json,
    recovery,
)
from adaptlab.plotting.graft import (
    bins_ece,
    plot_accuracy_vs_size,
    plot_overlap_heatmap,
    plot_reliability,
)
from adaptlab.training.metrics import expected_calibration_error, reliability_bins

SHAPES = {"layer.0.weight": (8, 16), "layer.0.bias": (16,), "layer.1.weight": (16, 4)}


def random_mask(rng: np.random.Generator, dense: bool) -> dict[str, torch.Tensor]:
    """A mask over SHAPES with a random number of random positions per tensor (some empty)."""
    mask = {}
    for name, shape in SHAPES.items():
        numel = int(np.prod(shape))
        idx = np.sort(rng.choice(numel, rng.integers(0, numel // 2 + 1), replace=False))
        if dense:
            flat = torch.zeros(numel, dtype=torch.bool)
            flat[torch.from_numpy(idx)] = True
            mask[name] = flat.reshape(shape)
        else:
            mask[name] = torch.from_numpy(idx).to(torch.int64)
    return mask


def as_set(mask: dict[str, torch.Tensor]) -> set[tuple[str, int]]:
    """The (name, flat position) pairs of a mask, built without the module under test."""
    out = set()
    for name, value in mask.items():
        positions = value.flatten().tolist()
        if value.dtype == torch.bool:
            positions = [i for i, on in enumerate(positions) if on]
        out |= {(name, i) for i in positions}
    return out


def test_docstring_examples():
    assert doctest.testmod(analysis).failed == 0


@pytest.mark.parametrize("seed", range(5))
def test_overlap_matches_set_arithmetic(seed):
    rng = np.random.default_rng(seed)
    masks = {f"task{t}": random_mask(rng, dense=bool(t % 2)) for t in range(4)}
    sets = {task: as_set(mask) for task, mask in masks.items()}
    result = mask_overlap(masks)
    assert result["tasks"] == list(masks)
    assert result["sizes"] == {task: len(s) for task, s in sets.items()}
    for i, gi in enumerate(masks):
        for j, gj in enumerate(masks):
            assert result["overlap"][i][j] == len(sets[gi] & sets[gj]) / len(sets[gj])
    json.dumps(result)


def test_dense_and_sparse_forms_agree():
    rng = np.random.default_rng(7)
    sparse = random_mask(rng, dense=False)
    dense = {
        name: torch.zeros(SHAPES[name], dtype=torch.bool).flatten().index_fill(0, idx, True)
        for name, idx in sparse.items()
    }
    dense = {name: value.reshape(SHAPES[name]) for name, value in dense.items()}
    assert as_set(dense) == as_set(sparse)
    for name, idx in mask_indices(dense).items():
        assert idx.tolist() == sparse[name].tolist()
    assert mask_overlap({"s": sparse, "d": dense})["overlap"] == [[1.0, 1.0], [1.0, 1.0]]


def test_overlap_is_asymmetric_and_empty_columns_are_nan():
    masks = {
        "a": {"w": torch.tensor([0, 1, 2, 3])},
        "b": {"w": torch.tensor([3, 4])},
        "c": {"v": torch.tensor([], dtype=torch.int64)},
        "d": {"v": torch.tensor([3])},
    }
    result = mask_overlap(masks)
    assert result["sizes"] == {"a": 4, "b": 2, "c": 0, "d": 1}
    a, b, c, d = result["overlap"]
    assert a[1] == 0.5 and b[0] == 0.25
    # "d" grafts position 3 of another tensor, so it shares nothing with "a" or "b".
    assert a[3] == 0.0 and d[0] == 0.0
    assert all(math.isnan(row[2]) for row in result["overlap"])
    assert c[:2] == [0.0, 0.0]
    strict = json.loads(json.dumps(overlap_json(result), allow_nan=False))
    assert [row[2] for row in strict["overlap"]] == [None] * 4


def test_graft_sizes_count_every_tensor():
    rng = np.random.default_rng(3)
    mask = random_mask(rng, dense=False)
    n = len(as_set(mask))
    n_eligible = sum(int(np.prod(s)) for s in SHAPES.values())
    sizes = graft_sizes(mask, n_eligible=n_eligible, n_params=10 * n_eligible)
    assert sizes == {
        "n_grafted": n,
        "fraction_eligible": n / n_eligible,
        "fraction_all": n / (10 * n_eligible),
    }
    assert graft_size({}) == 0


@pytest.mark.parametrize(
    "mask, match",
    [
        ({"w": torch.tensor([1.0, 2.0])}, "bool tensor shaped like the parameter"),
        ({"w": torch.tensor([[1, 2]])}, "1-D int64"),
        ({"w": torch.tensor([1, 1])}, "repeated or negative"),
        ({"w": torch.tensor([-1, 2])}, "repeated or negative"),
    ],
)
def test_bad_masks_are_named(mask, match):
    with pytest.raises(ValueError, match=match):
        mask_indices(mask)


def test_bad_sizes_and_empty_overlap():
    with pytest.raises(ValueError, match="at least one task"):
        mask_overlap({})
    with pytest.raises(ValueError, match="n_eligible <= n_params"):
        graft_sizes({}, n_eligible=10, n_params=5)
    with pytest.raises(ValueError, match="more than the 1 eligible"):
        graft_sizes({"w": torch.tensor([0, 1])}, n_eligible=1, n_params=5)


def test_recovery_both_definitions():
    assert recovery(0.8, 0.5, 0.9) == {"relative": 0.8 / 0.9, "gain": (0.8 - 0.5) / (0.9 - 0.5)}
    assert recovery(0.9, 0.5, 0.9) == {"relative": 1.0, "gain": 1.0}
    assert recovery(0.5, 0.5, 0.9)["gain"] == 0.0
    flat = recovery(0.6, 0.6, 0.6)
    assert flat["relative"] == 1.0 and math.isnan(flat["gain"])
    assert math.isnan(recovery(0.0, 0.0, 0.0)["relative"])


# ---------------------------------------------------------------------------------------------
# Figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def reliability_inputs(seed: int = 0, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, rng.integers(0, 4, n)


def test_reliability_figure_and_its_ece(tmp_path):
    probs, labels = reliability_inputs()
    bins = reliability_bins(probs, labels)
    assert bins_ece(bins) == pytest.approx(expected_calibration_error(probs, labels))
    curves = {"base": (probs, labels), "fine-tuned": bins, "grafted": (probs[:50], labels[:50])}
    path = plot_reliability(curves, tmp_path / "figs" / "reliability.png")
    assert path == tmp_path / "figs" / "reliability.png" and is_png(path)
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]


def test_overlap_heatmap_from_json(tmp_path):
    rng = np.random.default_rng(1)
    masks = {f"task{t}": random_mask(rng, dense=False) for t in range(3)}
    masks["empty"] = {}
    record = json.loads(json.dumps(overlap_json(mask_overlap(masks))))
    assert is_png(plot_overlap_heatmap(record, tmp_path / "overlap.png"))


def test_accuracy_vs_size(tmp_path):
    records = [
        {"kind": kind, "sparsity": s, "fraction_eligible": s * f, "accuracy": 0.5 + s * 1e3}
        for kind, f in (("learned", 1.2), ("top_delta", 1.0))
        for s in (1e-5, 1e-4, 1e-3)
    ]
    path = plot_accuracy_vs_size(records, tmp_path / "size.png", finetuned=0.92, base=0.5)
    assert is_png(path)


@pytest.mark.parametrize(
    "draw, match",
    [
        (lambda p: plot_reliability({}, p), "No reliability curves"),
        (lambda p: plot_reliability({"base": [1, 2, 3]}, p), "ReliabilityBins or a"),
        (lambda p: plot_overlap_heatmap({}, p), "no tasks"),
        (
            lambda p: plot_overlap_heatmap({"tasks": ["a", "b"], "overlap": [[1.0]]}, p),
            "one row and one column per task",
        ),
        (lambda p: plot_accuracy_vs_size([], p), "No sweep records"),
        (
            lambda p: plot_accuracy_vs_size(
                [{"kind": "random", "fraction_eligible": 0.1, "accuracy": 0.5}], p
            ),
            "kind 'random' is unknown",
        ),
        (
            lambda p: plot_accuracy_vs_size(
                [{"kind": "learned", "fraction_eligible": 0.0, "accuracy": 0.5}], p
            ),
            "must be > 0",
        ),
        (lambda p: plot_accuracy_vs_size([{"kind": "learned"}], p), "lacks"),
    ],
)
def test_bad_figure_inputs_raise(tmp_path, draw, match):
    with pytest.raises(ValueError, match=match):
        draw(tmp_path / "fig.png")
    assert not list(tmp_path.iterdir())

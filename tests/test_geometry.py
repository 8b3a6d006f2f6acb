"""Geometry metrics against independent computations.

kNN against scikit-learn's brute force, IDs against known dimensions and against DADApy
computing its own distances, clustering against well-separated blobs, overlaps against hand
counts and DADApy, and the ADP guard against a replay of DADApy's assignment.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import types
import warnings

import numpy as np
import pytest
import torch
from dadapy import Data
from sklearn.neighbors import NearestNeighbors

from adaptlab.errors import UserError
from adaptlab.geometry import (
    GeometryError,
    MetricSettings,
    Neighbours,
    adp,
    broken_link_points,
    check_adp_labels,
    dadapy_data,
    data_overlap,
    density_knn,
    gride,
    knn,
    label_overlap,
    layer_metrics,
    probe_accuracy,
    remove_duplicates,
    twonn,
)

FAST = MetricSettings(probe=False)
knn_module = importlib.import_module("adaptlab.geometry.knn")  # the package re-exports knn()


def blobs(n_per: int, centers: int, dim: int, seed: int = 0, spread: float = 20.0):
    """Well-separated isotropic Gaussian blobs ``[centers * n_per, dim]`` and their labels."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centers, dim)) * spread
    x = np.concatenate([rng.normal(size=(n_per, dim)) + m for m in mu])
    return x, np.repeat(np.arange(centers), n_per)


def sklearn_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x)
    return nn.kneighbors(x)


def explicit_distances(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.sqrt(((x[:, None, :] - x[idx]) ** 2).sum(-1))


def replay_table_reads(data: Data, z: float) -> list[int]:
    """Brute-force replay of DADApy's compiled ADP: points that reach its centre table."""
    log_den_min = np.min(data.log_den - z * data.log_den_err)
    g = (data.log_den - log_den_min + 1) - data.log_den_err
    nbr, kstar, n = data.dist_indices, data.kstar, data.N
    putative = [i for i in range(n) if not any(g[i] < g[nbr[i, j]] for j in range(1, kstar[i] + 1))]
    removed = {
        c
        for c in putative
        for i in range(n)
        for j in range(1, kstar[i] + 1)
        if nbr[i, j] == c and g[i] > g[c]
    }
    cluster = -np.ones(n, dtype=int)
    for label, c in enumerate(c for c in putative if c not in removed):
        cluster[c] = label
    reads = []
    for p in np.argsort(-g):
        for q in nbr[p, 1:]:
            if cluster[p] != -1:
                break
            cluster[p] = cluster[q]
        if cluster[p] == -1:
            reads.append(int(p))
            cluster[p] = 0
    return sorted(reads)


# ----------------------------------------------------------------------------------- kNN


@pytest.mark.parametrize("search", ["float32", "float64"])
def test_knn_matches_sklearn_brute_force(search):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 12)) @ rng.normal(size=(12, 48)) + 3.0
    # block_size 128 -> tiles of 512: 2 tiles per side, off-diagonal and ragged tiles merged
    dist, idx = knn(x, 40, block_size=128, search=search)
    ref_dist, ref_idx = sklearn_neighbours(x, 40)
    assert dist.dtype == np.float64 and idx.dtype == np.int64 and idx.shape == (700, 41)
    np.testing.assert_array_equal(idx[:, 0], np.arange(700))
    assert (dist[:, 0] == 0).all() and (np.diff(dist, axis=1) >= 0).all()
    np.testing.assert_array_equal(idx, ref_idx)  # continuous data: no ties
    np.testing.assert_allclose(dist[:, 1:], ref_dist[:, 1:], rtol=1e-12)
    np.testing.assert_allclose(dist, explicit_distances(x, idx), rtol=1e-14, atol=0)


@pytest.mark.parametrize("search", ["float32", "float64"])
def test_knn_breaks_ties_by_index(search):
    x = np.arange(6, dtype=np.float64)[:, None]  # 1-d lattice: equidistant neighbours
    dist, idx = knn(x, 4, search=search)  # no tie straddles the 4th place of rows 2 and 3
    np.testing.assert_array_equal(idx[2], [2, 1, 3, 0, 4])
    np.testing.assert_array_equal(idx[3], [3, 2, 4, 1, 5])
    np.testing.assert_array_equal(dist[3], [0, 1, 1, 2, 2])


def test_knn_float32_rows_it_cannot_certify_are_searched_again(monkeypatch):
    # A tight cluster (spread 1e-3) next to far points: float32 scores cannot order the
    # cluster's neighbours, so those rows must be redone in float64 - and still be exact.
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(300, 8)) * 1e-3, rng.normal(size=(60, 8)) * 1e3])
    redone = []
    original = knn_module._search_rows
    monkeypatch.setattr(
        knn_module,
        "_search_rows",
        lambda x_, norms, rows, *a: redone.append(len(rows)) or original(x_, norms, rows, *a),
    )
    dist, idx = knn(x, 20, search="float32")
    ref_dist, ref_idx = sklearn_neighbours(x, 20)
    assert sum(redone) >= 300
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, explicit_distances(x, idx), rtol=1e-13, atol=0)


def test_knn_accepts_bf16_tensors_and_torch_input():
    x = torch.randn(200, 16).to(torch.bfloat16)
    dist, idx = knn(x, 10)
    ref_dist, ref_idx = sklearn_neighbours(x.double().numpy(), 10)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(ref_idx, axis=1))
    np.testing.assert_allclose(dist[:, 1:], ref_dist[:, 1:], rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("search", ["float32", "float64"])
def test_knn_on_gpu_equals_cpu(search):
    x, _ = blobs(300, 4, 64)
    cpu = knn(x, 50, device="cpu")
    gpu = knn(x, 50, device="cuda", search=search)
    np.testing.assert_array_equal(gpu[1], cpu[1])
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-12)


def test_knn_too_few_points_is_a_clear_error():
    with pytest.raises(GeometryError, match=r"k=5 .* N=5"):
        knn(np.random.default_rng(0).normal(size=(5, 3)), 5)
    assert issubclass(GeometryError, UserError)


def test_knn_rejects_nan():
    x = np.ones((10, 3))
    x[4, 1] = np.nan
    with pytest.raises(GeometryError, match="1 rows with NaN"):
        knn(x, 3)


def test_remove_duplicates_keeps_first_occurrences_in_order():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [0.0, -0.0], [3.0, 4.0], [0.0, 0.0]])
    dedup = remove_duplicates(torch.from_numpy(x).float())
    np.testing.assert_array_equal(dedup.kept, [0, 1, 3])
    np.testing.assert_array_equal(dedup.inverse, [0, 1, 0, 2, 1, 2])
    np.testing.assert_array_equal(dedup.unique, x[[0, 1, 3]])
    assert dedup.n_duplicates == 3
    np.testing.assert_array_equal(dedup.unique[dedup.inverse], x)


def test_remove_duplicates_is_exact_when_rows_differ_in_one_column():
    # row i > 0 differs from row 0 in column i - 1 only: most rows share any few-column hash
    x = np.tile(np.random.default_rng(9).normal(size=200), (201, 1))
    x[np.arange(1, 201), np.arange(200)] += 1.0
    assert remove_duplicates(x).n_duplicates == 0
    dedup = remove_duplicates(np.concatenate([x, x[[150]]]))
    assert dedup.n_duplicates == 1 and dedup.inverse[-1] == 150


# --------------------------------------------------------------------- intrinsic dimension


def test_id_of_a_linear_subspace_and_of_a_flat_torus():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(2000, 4)) @ rng.normal(size=(4, 64))  # 4-d subspace of R^64
    angles = rng.uniform(0, 2 * np.pi, size=(2000, 3))  # flat 3-torus, rotated into R^64
    rotation = np.linalg.qr(rng.normal(size=(64, 6)))[0].T
    torus = np.concatenate([np.cos(angles), np.sin(angles)], axis=1) @ rotation
    for x, true_dim in ((plane, 4), (torus, 3)):
        data = dadapy_data(*knn(x, 64))
        assert abs(twonn(data).ids[0] - true_dim) < 0.25
        profile = gride(data, range_max=64)
        np.testing.assert_array_equal(profile.n1, [1, 2, 4, 8, 16, 32])
        assert abs(profile.at(16) - true_dim) < 0.25


def test_ids_density_and_peaks_equal_dadapy_on_its_own_distances():
    rng = np.random.default_rng(2)
    x, _ = blobs(250, 4, 6, seed=2, spread=4.0)
    x = x @ rng.normal(size=(6, 40))
    ref = Data(coordinates=x, maxk=100, verbose=False)
    ref.compute_distances(maxk=100)
    ref_twonn = ref.compute_id_2NN()[0]
    ref_ids = ref.return_id_scaling_gride(range_max=100)[0]
    ref.set_id(ref_ids[4])
    ref.compute_density_kNN(k=16)
    ref_labels = ref.compute_clustering_ADP(Z=1.6, halo=False).copy()

    dist, idx = knn(x, 100)
    np.testing.assert_array_equal(idx, ref.dist_indices)
    ours = dadapy_data(dist, idx)
    np.testing.assert_allclose(twonn(ours).ids[0], ref_twonn, rtol=1e-10)
    profile = gride(ours, range_max=100)
    np.testing.assert_array_equal(profile.n1, [1, 2, 4, 8, 16, 32])
    np.testing.assert_allclose(profile.ids, ref_ids, rtol=1e-10)
    density_knn(ours, profile.at(16), k=16)
    np.testing.assert_allclose(ours.log_den, ref.log_den, rtol=1e-10)
    clusters = adp(ours, z=1.6)
    assert clusters.n_clusters == ref.N_clusters == 4
    np.testing.assert_array_equal(clusters.labels, ref_labels)

    # DADApy's own neighbours through our wrappers: the very same numbers
    theirs = dadapy_data(ref.distances, ref.dist_indices)
    assert twonn(theirs).ids[0] == ref_twonn
    np.testing.assert_array_equal(gride(theirs, range_max=100).ids, ref_ids)


# ------------------------------------------------------------------------------ clustering


def test_layer_metrics_on_separated_blobs():
    x, subjects = blobs(150, 4, 10)
    letters = np.tile(np.array(list("ABCD")), 150)
    record, neighbours = layer_metrics(
        x.astype(np.float32), {"subjects": subjects, "letters": letters}, FAST
    )
    assert record["n"] == 600 and record["n_duplicates"] == 0 and record["maxk"] == 599
    assert record["n_clusters"] == 4
    assert record["ari_subjects"] > 0.99 and record["nmi_subjects"] > 0.99
    assert record["homogeneity_subjects"] > 0.99 and record["completeness_subjects"] > 0.99
    assert record["overlap_subjects"] == 1.0
    assert abs(record["ari_letters"]) < 0.05
    assert record["cluster_size_mean"] == 150 and record["cluster_size_max"] == 150
    assert 0.5 < record["core_fraction"] <= 1
    assert record["gride_scales"] == [1, 2, 4, 8, 16, 32]
    assert record["id_gride"] == record["id_gride_profile"][4]
    assert record["adp_backend"] == "cython"
    assert neighbours.k == 599 and data_overlap(neighbours, neighbours) == 1.0
    assert "probe_subjects" not in record


def test_adp_guard_rejects_garbage_and_inconsistent_labels():
    members = [[0, 1], [2, 3]]
    check_adp_labels(np.array([0, 0, 1, 1]), 2, members, halo=False)
    check_adp_labels(np.array([0, -1, 1, -1]), 2, members, halo=True)
    with pytest.raises(GeometryError, match="outside"):
        check_adp_labels(np.array([0, 0, 4616842213449375055, 1]), 2, members, halo=False)
    with pytest.raises(GeometryError, match="outside"):
        check_adp_labels(np.array([0, -1, 1, 1]), 2, members, halo=False)
    with pytest.raises(GeometryError, match="contradict"):  # garbage that happens to be 0
        check_adp_labels(np.array([0, 0, 0, 1]), 2, members, halo=False)


def test_points_that_hit_dadapy_issue_165_are_found_and_avoided():
    # A PAk density (variable kstar) with few neighbours reaches the mis-paired table of
    # dadapy<=0.3.4's compiled ADP; a kNN density with maxk >= k never does.
    x = np.random.default_rng(2).standard_t(2, size=(300, 4))
    data = dadapy_data(*knn(x, 12))
    data.set_id(4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.compute_density_PAk()
    broken = broken_link_points(data, 1.6)
    assert broken.tolist() == replay_table_reads(data, 1.6) == [59]
    with pytest.raises(GeometryError, match="issue #165"):
        adp(data, 1.6, backend="cython")
    clusters = adp(data, 1.6, backend="auto")
    assert clusters.backend == "python"
    assert ((clusters.labels >= 0) & (clusters.labels < clusters.n_clusters)).all()

    data = dadapy_data(*knn(x, 12))
    density_knn(data, 4.0, k=12)
    assert len(broken_link_points(data, 1.6)) == 0


def test_python_and_cython_adp_agree_when_the_table_is_not_read():
    x, _ = blobs(100, 3, 5, seed=3, spread=3.0)
    data = dadapy_data(*knn(x, 60))
    density_knn(data, gride(data).at(16), k=16)
    cython = adp(data, 1.6, backend="cython")
    python = adp(data, 1.6, backend="python")
    assert cython.n_clusters == python.n_clusters
    np.testing.assert_array_equal(cython.labels, python.labels)
    np.testing.assert_array_equal(cython.core_labels, python.core_labels)


# -------------------------------------------------------------------------------- overlaps


def test_label_overlap_by_hand():
    labels = np.array(["a", "a", "a", "a", "b", "b"])
    idx = np.array([[0, 1, 4], [1, 0, 2], [2, 5, 0], [3, 2, 1], [4, 5, 0], [5, 0, 4]])
    # class_fraction 0.5: k = 2 for "a" (4 points), k = 1 for "b" (2 points)
    # chi_a = [1/2, 2/2, 1/2, 2/2] -> mean 0.75; chi_b = [1, 0] -> mean 0.5
    assert label_overlap(idx, labels, class_fraction=0.5) == pytest.approx((0.75 + 0.5) / 2)


def test_label_overlap_equals_dadapy_and_is_one_on_sorted_data():
    x, y = blobs(60, 3, 5, seed=4, spread=1.0)
    y = np.where(np.random.default_rng(4).uniform(size=len(y)) < 0.2, 0, y)  # imbalanced
    dist, idx = knn(x, 100)
    ref = dadapy_data(dist, idx).return_label_overlap(y, class_fraction=0.3)
    assert label_overlap(idx, y, 0.3) == pytest.approx(ref, rel=1e-12)
    x_sorted, y_sorted = blobs(60, 3, 5, seed=4, spread=50.0)
    assert label_overlap(knn(x_sorted, 30)[1], y_sorted, 0.3) == 1.0


def test_clipped_maxk_is_said_once_per_n(caplog, monkeypatch):
    from adaptlab.geometry import layer

    monkeypatch.setattr(layer, "_CLIPPED", set())  # what earlier tests reported
    x, _ = blobs(30, 2, 4)  # 60 points, maxk 100
    settings = MetricSettings(maxk=100, density_k=5, overlap_k=5, id_scale=2, probe=False)
    with caplog.at_level("WARNING", logger="adaptlab.geometry.layer"):
        records = [layer_metrics(x[: 60 - i // 2], {}, settings)[0] for i in range(3)]
    assert [r["maxk"] for r in records] == [59, 59, 58]  # each record keeps the k it used
    said = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert said == [
        "maxk=100 clipped to N-1=59 (N unique points); said once per N.",
        "maxk=100 clipped to N-1=58 (N unique points); said once per N.",
    ]


def test_label_overlap_needing_more_than_maxk_is_an_error():
    x, y = blobs(100, 2, 4)
    with pytest.raises(GeometryError, match=r"k=30 neighbours .* only 20"):
        label_overlap(knn(x, 20)[1], y, 0.3)
    with pytest.raises(GeometryError, match=r"label overlap of 'y' needs k=30"):
        layer_metrics(x, {"y": y}, MetricSettings(maxk=20, overlap_k=10, id_scale=8, probe=False))


def test_data_overlap_equals_dadapy_and_follows_duplicates():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(400, 10))
    b = a + 0.3 * rng.normal(size=a.shape)
    na, nb = (Neighbours(*knn(v, 30), np.arange(400), np.arange(400)) for v in (a, b))
    ref = dadapy_data(na.dist, na.idx).return_data_overlap(distances=(nb.dist, nb.idx), k=30)
    value = data_overlap(na, nb, k=30)
    assert value == pytest.approx(ref, rel=1e-12) and 0.2 < value < 0.95
    assert data_overlap(na, na, k=30) == 1.0

    # rows 400.. repeat rows 0..49: the same representation with duplicates still overlaps 1,
    # and its overlap with the duplicate-free one counts neighbours by original example id
    dup = np.concatenate([a, a[:50]])
    rec, with_dups = layer_metrics(dup, {}, MetricSettings(maxk=60, probe=False))
    assert rec["n"] == 400 and rec["n_duplicates"] == 50
    assert data_overlap(with_dups, with_dups, k=30) == 1.0
    plain = Neighbours(*knn(a, 30), np.arange(400), np.arange(400))
    padded = Neighbours(
        plain.dist, plain.idx, plain.kept, np.concatenate([plain.inverse[:400], np.arange(50)])
    )
    assert data_overlap(with_dups, padded, k=30) == 1.0
    with pytest.raises(GeometryError, match="same examples"):
        data_overlap(with_dups, plain)


# ------------------------------------------------------------------------ layer and probe


def test_layer_metrics_removes_duplicates_and_filters_labels():
    x, y = blobs(100, 3, 6, seed=6)
    x = np.concatenate([x, x[:40]])
    y = np.concatenate([y, y[:40]])
    record, neighbours = layer_metrics(
        torch.from_numpy(x), {"subjects": y.astype(str)}, MetricSettings(maxk=100, probe=True)
    )
    assert record["n"] == 300 and record["n_input"] == 340 and record["n_duplicates"] == 40
    assert neighbours.idx.shape == (300, 101) and len(neighbours.inverse) == 340
    assert record["ari_subjects"] > 0.99 and record["probe_subjects"] == 1.0
    assert record["n_classes_subjects"] == 3


def test_layer_metrics_too_few_points_names_n_and_k():
    x = np.random.default_rng(7).normal(size=(20, 5))
    with pytest.raises(GeometryError, match=r"GRIDE at id_scale=16 needs k=32 .* N=20"):
        layer_metrics(x, {}, FAST)
    with pytest.raises(GeometryError, match="one label per row"):
        layer_metrics(np.ones((40, 3)), {"y": np.zeros(39)}, FAST)


def test_layer_metrics_refuses_identical_rows_when_asked_to_keep_them():
    x, _ = blobs(50, 2, 4)
    x[7] = x[3]
    with pytest.raises(GeometryError, match="remove_duplicates=True"):
        layer_metrics(x, {}, MetricSettings(remove_duplicates=False, probe=False))


def test_probe_accuracy_separable_and_chance():
    x, y = blobs(60, 3, 8, seed=8)
    assert probe_accuracy(x, y) == 1.0
    noise = np.random.default_rng(8).normal(size=(300, 8))
    assert probe_accuracy(noise, np.repeat([0, 1], 150)) < 0.7
    assert np.isnan(probe_accuracy(noise, np.zeros(300)))


@pytest.mark.parametrize(
    "field, value",
    [("id_scale", 12), ("id_scale", 64), ("z", 0.0), ("class_fraction", 1.5), ("maxk", 1)],
)
def test_metric_settings_validation(field, value):
    with pytest.raises(ValueError, match=field):
        MetricSettings(**{field: value})


def test_layer_metrics_validates_settings_handed_over_as_a_namespace():
    x, _ = blobs(100, 2, 4)
    settings = types.SimpleNamespace(**dataclasses.asdict(FAST))
    record, _ = layer_metrics(x, {}, settings)
    assert record["n_clusters"] == 2
    settings.id_scale = 12
    with pytest.raises(ValueError, match="power of two"):
        layer_metrics(x, {}, settings)


@pytest.mark.parametrize("module", ["knn", "intrinsic_dim", "clustering", "agreement", "layer"])
def test_quick_starts_in_docstrings_run(module):
    result = doctest.testmod(importlib.import_module(f"adaptlab.geometry.{module}"))
    assert result.attempted > 0 and result.failed == 0


def test_wide_probe_projection_is_exact():
    """On D > N the probe fits on the span of the training rows: same predictions as raw rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from adaptlab.geometry.agreement import SpanProjection

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 300))
    y = (x[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(int)
    test = rng.normal(size=(15, 300))
    raw = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, tol=1e-10))
    projected = make_pipeline(
        StandardScaler(), SpanProjection(), LogisticRegression(max_iter=5000, tol=1e-10)
    )
    raw.fit(x, y)
    projected.fit(x, y)
    np.testing.assert_allclose(
        raw.decision_function(test), projected.decision_function(test), rtol=1e-4, atol=1e-5
    )

"""kNN density and ADP density-peak clustering with DADApy, with a guard on its labels.

DADApy's compiled ADP in releases up to 0.3.4 (the newest on PyPI) has a bug (issue #165,
fixed upstream by PR #176): the table linking a removed density peak to the denser point that
absorbs it is written one row off. The table is read only for a point none of whose ``maxk``
neighbours is assigned yet when its turn comes; such a point then gets a wrong cluster or none,
and "none" leaves an uninitialised (``np.empty``) label: garbage such as 4616842213449375055.

So every clustering here is checked twice:

- before: :func:`broken_link_points` finds the points that would read the table (replaying
  DADApy's own order); ``adp_backend="auto"`` then runs DADApy's pure-Python ADP, which pairs
  the table correctly, and ``"cython"`` refuses;
- after: every label must lie in ``[-1, n_clusters)`` and agree with DADApy's own list of the
  points of each cluster, else :class:`GeometryError`.

The kNN density of the spec (the same ``k`` for every point) never fills the table: a denser
point ``i`` (smaller ``k``-th neighbour distance) with a peak ``c`` among its ``k`` nearest is
closer to ``c`` than ``c``'s own ``k``-th neighbour, so ``c`` has a denser neighbour and is no
peak (ties aside). Densities with a per-point ``k`` (PAk, kstar-NN) do fill and read it.

Quick start::

    >>> import numpy as np
    >>> from adaptlab.geometry.intrinsic_dim import dadapy_data, gride
    >>> from adaptlab.geometry.knn import knn
    >>> rng = np.random.default_rng(0)
    >>> blobs = np.concatenate([rng.normal(size=(300, 5)) + 10 * c for c in range(3)])
    >>> data = dadapy_data(*knn(blobs, k=100))
    >>> _ = density_knn(data, gride(data).at(16), k=16)
    >>> clusters = adp(data, z=1.6)
    >>> clusters.n_clusters, clusters.sizes.tolist()
    (3, [300, 300, 300])
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Literal

import numpy as np
from dadapy import Data
from packaging.version import Version

from adaptlab.geometry.knn import GeometryError

logger = logging.getLogger(__name__)

AdpBackend = Literal["auto", "cython", "python"]

# Last release whose compiled ADP mis-pairs the removed-centre table (issue #165).
_LAST_BROKEN_RELEASE = Version("0.3.4")


@dataclass(frozen=True)
class Clusters:
    """ADP density peaks of one representation.

    Attributes:
        labels: ``[N]`` cluster of every point (``halo=False``), in ``[0, n_clusters)``.
        core_labels: ``[N]`` cluster of the core points (``halo=True``), ``-1`` for the halo.
        n_clusters: number of density peaks.
        centers: ``[n_clusters]`` index of the densest point of each cluster.
        backend: the ADP implementation that ran (``cython`` or ``python``).
    """

    labels: np.ndarray
    core_labels: np.ndarray
    n_clusters: int
    centers: np.ndarray
    backend: str

    @property
    def core_fraction(self) -> float:
        """Fraction of points in a cluster core, ``mean(core_labels != -1)``."""
        return float(np.mean(self.core_labels != -1))

    @property
    def sizes(self) -> np.ndarray:
        """``[n_clusters]`` points per cluster (``halo=False``)."""
        return np.bincount(self.labels, minlength=self.n_clusters)

    def statistics(self) -> dict[str, float | int]:
        """Number of clusters, core fraction and cluster-size statistics, JSON-ready."""
        sizes = self.sizes
        return {
            "n_clusters": int(self.n_clusters),
            "core_fraction": self.core_fraction,
            "cluster_size_mean": float(sizes.mean()),
            "cluster_size_std": float(sizes.std()),
            "cluster_size_max": int(sizes.max()),
            "cluster_size_min": int(sizes.min()),
        }


def density_knn(data: Data, intrinsic_dim: float, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """kNN log-density at a given ID: DADApy ``set_id`` then ``compute_density_kNN(k)``.

    Args:
        data: DADApy data with at least ``k`` neighbours per point.
        intrinsic_dim: the ID the density volume uses (spec: GRIDE at ``n1 = 16``).
        k: neighbours per density estimate.

    Returns:
        ``log_den`` ``[N]`` and its error ``[N]``.
    """
    if k > data.maxk:
        raise GeometryError(
            f"kNN density with k={k} needs {k} neighbours but the data have maxk={data.maxk}; "
            "lower density_k or raise maxk."
        )
    data.set_id(intrinsic_dim)
    return data.compute_density_kNN(k=k)


def broken_link_points(data: Data, z: float) -> np.ndarray:
    """Points for which DADApy's compiled ADP reads its removed-centre table.

    Replays DADApy's steps: putative centres (no denser point among their ``kstar``
    neighbours), removed centres (inside the ``kstar``-neighbourhood of a denser point), then
    the preliminary assignment in decreasing density ``g``, where a point takes the cluster of
    its first already-assigned neighbour. A point with no surviving centre and no denser point
    among all its neighbours falls through to the table. Equal densities count as unsafe.

    Args:
        data: DADApy data after a density estimate (``log_den``, ``log_den_err``, ``kstar``).
        z: the ADP merging parameter (it shifts ``g`` as DADApy does, so rounding matches).

    Returns:
        ``[M]`` indices of such points (empty when the table is never read).
    """
    log_den_min = np.min(data.log_den - z * data.log_den_err)
    g = (data.log_den - log_den_min + 1) - data.log_den_err
    nbr = data.dist_indices[:, 1:]
    kstar = np.asarray(data.kstar)
    within = np.arange(1, int(kstar.max()) + 1)[None, :] <= kstar[:, None]
    g_nbr = g[nbr[:, : within.shape[1]]]
    putative = ~((g_nbr > g[:, None]) & within).any(axis=1)
    pairs = within & putative[nbr[:, : within.shape[1]]] & (g[:, None] > g_nbr)
    removed = np.zeros(len(g), dtype=bool)
    removed[nbr[:, : within.shape[1]][pairs]] = True
    centre = putative & ~removed
    candidates = np.flatnonzero(removed)
    safe = (g[nbr[candidates]] > g[candidates, None]) | centre[nbr[candidates]]
    return candidates[~safe.any(axis=1)]


def _run_cython(data: Data, z: float, halo: bool) -> np.ndarray:
    return data.compute_clustering_ADP(Z=z, halo=halo)


def _run_python(data: Data, z: float, halo: bool) -> np.ndarray:
    return data.compute_clustering_ADP_pure_python(Z=z, halo=halo)


ADP_BACKENDS: dict[str, Callable[[Data, float, bool], np.ndarray]] = {
    "cython": _run_cython,
    "python": _run_python,
}
"""DADApy ADP implementations by name: ``fn(data, z, halo) -> labels [N]``."""


def adp(data: Data, z: float = 1.6, backend: AdpBackend = "auto") -> Clusters:
    """ADP density-peak clustering (d'Errico et al. 2021), with and without the halo.

    Calls DADApy ``compute_clustering_ADP(Z=z, halo=False)`` for the labels and the number of
    clusters, and again with ``halo=True`` for the core points, then checks both (see the
    module docstring).

    Args:
        data: DADApy data after :func:`density_knn` (or another density estimate).
        z: merging parameter: the larger, the fewer peaks (spec 1.6; paper figures 1.68).
        backend: ``cython`` (DADApy's compiled ADP), ``python`` (DADApy's pure-Python ADP,
            slower) or ``auto``: cython unless the installed DADApy would read its broken
            table for some point, then python.

    Raises:
        GeometryError: no density yet, ``backend="cython"`` on data that hit the DADApy bug,
            or labels outside ``[-1, n_clusters)`` / inconsistent with DADApy's clusters.
    """
    if data.log_den is None:
        raise GeometryError("adp needs a density first; call density_knn(data, id, k).")
    if backend not in ("auto", *ADP_BACKENDS):
        raise GeometryError(
            f"adp_backend={backend!r} is not one of auto, {', '.join(ADP_BACKENDS)}."
        )
    broken = broken_link_points(data, z) if _compiled_adp_is_broken() else np.array([], int)
    if backend == "cython" and len(broken):
        raise GeometryError(
            f"dadapy {metadata.version('dadapy')}'s compiled ADP would assign {len(broken)} "
            "points through its mis-paired removed-centre table (DADApy issue #165); "
            "use adp_backend='auto' or 'python', or raise maxk."
        )
    if backend == "auto":
        backend = "python" if len(broken) else "cython"
        if len(broken):
            logger.warning(
                "%d points would hit DADApy issue #165 in the compiled ADP; "
                "using DADApy's pure-Python ADP for this representation.",
                len(broken),
            )
    run = ADP_BACKENDS[backend]
    labels = np.asarray(run(data, z, False))
    n_clusters = int(data.N_clusters)
    check_adp_labels(labels, n_clusters, data.cluster_indices, halo=False)
    centers = np.asarray(data.cluster_centers, dtype=np.int64)
    core = np.asarray(run(data, z, True))
    check_adp_labels(core, n_clusters, data.cluster_indices, halo=True)
    if int(data.N_clusters) != n_clusters or not np.all((core == labels) | (core == -1)):
        raise GeometryError("ADP with and without halo disagree; report this data to DADApy.")
    return Clusters(labels.astype(np.int64), core.astype(np.int64), n_clusters, centers, backend)


def check_adp_labels(
    labels: np.ndarray, n_clusters: int, cluster_indices: list, halo: bool
) -> None:
    """Check ADP labels against ``[-1, n_clusters)`` and DADApy's own cluster membership.

    Args:
        labels: ``[N]`` labels returned by DADApy.
        n_clusters: DADApy's ``N_clusters``.
        cluster_indices: DADApy's ``cluster_indices``: the points of each cluster.
        halo: whether ``labels`` may hold ``-1`` (halo points).

    Raises:
        GeometryError: a label outside ``[-1, n_clusters)`` (the garbage of DADApy issue
            #165), a point in no cluster or in two, or a label that contradicts the membership.
    """
    labels = np.asarray(labels)
    low = -1 if halo else 0
    bad = (labels < low) | (labels >= n_clusters)
    if not np.issubdtype(labels.dtype, np.integer) or bad.any():
        raise GeometryError(
            f"DADApy's ADP returned {int(bad.sum())} labels outside [{low}, {n_clusters}) "
            f"(e.g. {labels[bad][:3].tolist()}): uninitialised labels, DADApy issue #165; "
            "use adp_backend='python' or a DADApy release with PR #176."
        )
    expected = np.full(len(labels), -2, dtype=np.int64)
    counts = np.zeros(len(labels), dtype=np.int64)
    for cluster, members in enumerate(cluster_indices):
        members = np.asarray(members, dtype=np.int64)
        expected[members] = cluster
        counts[members] += 1
    ok = (labels == expected) | (halo & (labels == -1))
    if len(cluster_indices) != n_clusters or (counts != 1).any() or not ok.all():
        raise GeometryError(
            f"DADApy's ADP labels contradict its cluster membership for {int((~ok).sum())} "
            f"points ({int((counts != 1).sum())} in no cluster or in two); use "
            "adp_backend='python' or a DADApy release with PR #176."
        )


def _compiled_adp_is_broken() -> bool:
    return Version(metadata.version("dadapy")) <= _LAST_BROKEN_RELEASE

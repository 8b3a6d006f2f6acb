"""Every metric of one layer's representation (spec §9), as one flat JSON-ready record.

Steps, with the spec's parameters as defaults (:class:`MetricSettings`):

1. float64; exact duplicate rows dropped (first occurrence kept, labels filtered alike);
2. exact kNN up to ``maxk`` in torch (GPU when given), fed to DADApy as ``(dist, idx)``;
3. TwoNN, and the GRIDE profile up to rank ``gride_range_max``; the ID reported and used for
   the density is GRIDE at ``n1 = id_scale``;
4. kNN density (``k = density_k``), ADP peaks at ``Z = z`` without and with the halo;
5. per labelling: ARI/AMI/NMI/homogeneity/completeness of the peaks, label overlap, probe.

All size requirements are checked before the kNN, so a bad setting fails in milliseconds.

Quick start::

    >>> import numpy as np
    >>> subjects = np.repeat(["anatomy", "astronomy", "virology"], 200)
    >>> x = np.random.default_rng(0).normal(size=(600, 5)) + 10 * (np.arange(600)[:, None] // 200)
    >>> record, neighbours = layer_metrics(x, {"subjects": subjects}, MetricSettings(probe=False))
    >>> record["n_clusters"], record["ari_subjects"], record["overlap_subjects"]
    (3, 1.0, 1.0)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import numpy as np
import torch

from adaptlab.geometry.agreement import (
    data_overlap,
    encode_labels,
    label_agreement,
    label_overlap,
    label_overlap_k,
    probe_accuracy,
)
from adaptlab.geometry.clustering import ADP_BACKENDS, AdpBackend, adp, density_knn
from adaptlab.geometry.intrinsic_dim import dadapy_data, gride, twonn
from adaptlab.geometry.knn import (
    Dedup,
    GeometryError,
    Neighbours,
    Search,
    as_float64,
    knn,
    remove_duplicates,
)

logger = logging.getLogger(__name__)

__all__ = ["MetricSettings", "data_overlap", "layer_metrics"]


@dataclass
class MetricSettings:
    """Parameters of the per-layer metrics (defaults: spec §9).

    Args:
        maxk: neighbours computed per point; clipped to N-1 (a warning, once per N).
        gride_range_max: GRIDE scaling up to this neighbour rank (100: 6 scales, n1 = 1..32;
            1000 gives the 9-scale profile of the dev code).
        id_scale: n1 of the GRIDE ID that is reported and used for the density (spec:
            ``ids[log2 16]``); a power of two with ``2 * id_scale <= gride_range_max``.
        density_k: neighbours of the kNN density (tied to the ID scale).
        z: ADP merging parameter Z (the paper's figures use 1.68).
        class_fraction: label overlap neighbours as a fraction of the class size.
        overlap_k: neighbours compared by the data overlap between runs.
        probe: also fit a cross-validated linear probe per labelling (the slowest metric).
        probe_folds: stratified folds of the probe.
        probe_seed: seed of the probe's fold split.
        block_size: largest kNN tile side: memory is about 2 block_size^2 scores plus the
            [N, maxk+1] neighbour lists.
        remove_duplicates: drop repeated rows first (they make TwoNN/GRIDE divide by zero).
        search: kNN search precision: ``auto`` (float64 on CPUs and data-centre GPUs, float32
            where float64 is slow), ``float32`` or ``float64``; exact neighbours either way.
        adp_backend: DADApy ADP implementation: ``auto`` (compiled, or pure Python where the
            compiled one of dadapy<=0.3.4 would hit issue #165), ``cython`` or ``python``.
        twonn_fraction: fraction of TwoNN ratios kept in the fit (DADApy default 0.9).
    """

    maxk: int = 1000
    gride_range_max: int = 100
    id_scale: int = 16
    density_k: int = 16
    z: float = 1.6
    class_fraction: float = 0.3
    overlap_k: int = 30
    probe: bool = True
    probe_folds: int = 5
    probe_seed: int = 0
    block_size: int = 4096
    remove_duplicates: bool = True
    search: Search = "auto"
    adp_backend: AdpBackend = "auto"
    twonn_fraction: float = 0.9

    def __post_init__(self) -> None:
        positive = ("maxk", "gride_range_max", "density_k", "overlap_k", "block_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.maxk < 2:
            raise ValueError(f"maxk={self.maxk} must be at least 2 (TwoNN uses 2 neighbours).")
        if self.id_scale < 1 or self.id_scale & (self.id_scale - 1):
            raise ValueError(f"id_scale={self.id_scale} must be a power of two (1, 2, 4, ...).")
        if 2 * self.id_scale > self.gride_range_max:
            raise ValueError(
                f"id_scale={self.id_scale} needs gride_range_max >= {2 * self.id_scale}, "
                f"got {self.gride_range_max}; raise gride_range_max or lower id_scale."
            )
        if self.z <= 0:
            raise ValueError(f"z={self.z} must be positive (spec 1.6, paper figures 1.68).")
        if not 0 < self.class_fraction <= 1:
            raise ValueError(f"class_fraction={self.class_fraction} must be in (0, 1].")
        if self.probe_folds < 2:
            raise ValueError(f"probe_folds={self.probe_folds} must be at least 2.")
        if not 0 < self.twonn_fraction <= 1:
            raise ValueError(f"twonn_fraction={self.twonn_fraction} must be in (0, 1].")
        if self.search not in ("auto", "float32", "float64"):
            raise ValueError(f"search={self.search!r} must be auto, float32 or float64.")
        if self.adp_backend not in ("auto", *ADP_BACKENDS):
            raise ValueError(f"adp_backend={self.adp_backend!r} must be auto, cython or python.")


def layer_metrics(
    x: np.ndarray | torch.Tensor,
    labels: dict[str, np.ndarray],
    settings: MetricSettings,
    device: str | torch.device | None = None,
) -> tuple[dict, Neighbours]:
    """Intrinsic dimension, density peaks and label agreement of one layer.

    Args:
        x: ``[N, D]`` representation of N examples (any float dtype; analysed in float64).
        labels: labellings of the N examples by name, e.g. ``{"subjects": [N], "letters": [N]}``
            (strings or integers).
        settings: metric parameters.
        device: where the kNN runs (``None``/``"auto"``: GPU when available); DADApy runs on
            the CPU.

    Returns:
        A flat JSON-ready record and the neighbours (for :func:`data_overlap` between runs).
        Record keys: ``n`` (after dedup), ``n_input``, ``n_duplicates``, ``maxk``,
        ``id_twonn``, ``id_gride`` (GRIDE at ``id_scale``), ``id_gride_err``,
        ``id_gride_profile``, ``id_gride_profile_err``, ``gride_scales`` (n1 of the profile),
        ``gride_radii``, ``n_clusters``, ``core_fraction``, ``cluster_size_mean``/``_std``/
        ``_max``/``_min``, ``adp_backend``; and for each labelling ``L``: ``ari_L``, ``ami_L``,
        ``nmi_L``, ``homogeneity_L``, ``completeness_L``, ``overlap_L``, ``n_classes_L`` and,
        with ``settings.probe``, ``probe_L``.

    Raises:
        GeometryError: bad ``x`` or labels, or too few (unique) points for the neighbours
            the metrics need.
    """
    if not isinstance(settings, MetricSettings):  # e.g. a config parser's namespace: validate
        names = [f.name for f in fields(MetricSettings)]
        settings = MetricSettings(**{name: getattr(settings, name) for name in names})
    x64 = as_float64(x)
    n_input = len(x64)
    codes = {
        name: encode_labels(y, n_input, name=f"labels[{name!r}]") for name, y in labels.items()
    }
    dedup = remove_duplicates(x64) if settings.remove_duplicates else _identity(x64)
    codes = {name: y[dedup.kept] for name, y in codes.items()}
    n = len(dedup.kept)
    maxk = _check_sizes(n, codes, settings)

    dist, idx = knn(dedup.unique, maxk, settings.block_size, device, settings.search)
    if not settings.remove_duplicates and (dist[:, 1] == 0).any():
        raise GeometryError(
            f"x has {int((dist[:, 1] == 0).sum())} rows with an identical twin, which break "
            "TwoNN and GRIDE; set remove_duplicates=True."
        )
    neighbours = Neighbours(dist, idx, dedup.kept, dedup.inverse)

    data = dadapy_data(dist, idx)
    two = twonn(data, settings.twonn_fraction)
    profile = gride(data, settings.gride_range_max)
    id_used = profile.at(settings.id_scale)
    density_knn(data, id_used, settings.density_k)
    clusters = adp(data, settings.z, settings.adp_backend)

    scale = int(np.flatnonzero(profile.n1 == settings.id_scale)[0])
    record: dict = {
        "n": n,
        "n_input": n_input,
        "n_duplicates": dedup.n_duplicates,
        "maxk": maxk,
        "id_twonn": float(two.ids[0]),
        "id_gride": id_used,
        "id_gride_err": float(profile.errors[scale]),
        "id_gride_profile": profile.ids.tolist(),
        "id_gride_profile_err": profile.errors.tolist(),
        "gride_scales": profile.n1.tolist(),
        "gride_radii": profile.radii.tolist(),
        **clusters.statistics(),
        "adp_backend": clusters.backend,
    }
    for name, y in codes.items():
        for score, value in label_agreement(clusters.labels, y).items():
            record[f"{score}_{name}"] = value
        record[f"overlap_{name}"] = label_overlap(idx, y, settings.class_fraction)
        record[f"n_classes_{name}"] = int(y.max()) + 1
        if settings.probe:
            record[f"probe_{name}"] = probe_accuracy(
                dedup.unique, y, settings.probe_folds, settings.probe_seed
            )
    return record, neighbours


# (maxk asked, maxk used) pairs already reported: a study of hundreds of layers of the same N
# says it once, not once per layer (each record keeps the maxk it used).
_CLIPPED: set[tuple[int, int]] = set()


def _check_sizes(n: int, codes: dict[str, np.ndarray], settings: MetricSettings) -> int:
    """``maxk`` clipped to ``n - 1``; GeometryError if a metric needs more neighbours."""
    maxk = min(settings.maxk, n - 1)
    if maxk < settings.maxk and (settings.maxk, maxk) not in _CLIPPED:
        _CLIPPED.add((settings.maxk, maxk))
        logger.warning(
            "maxk=%d clipped to N-1=%d (N unique points); said once per N.", settings.maxk, maxk
        )
    needs = {
        "TwoNN": 2,
        f"GRIDE at id_scale={settings.id_scale}": 2 * settings.id_scale,
        "kNN density (density_k)": settings.density_k,
        "data overlap (overlap_k)": settings.overlap_k,
    }
    for name, y in codes.items():
        needs[f"label overlap of {name!r}"] = int(label_overlap_k(y, settings.class_fraction).max())
    what, k = max(needs.items(), key=lambda item: item[1])
    if k > maxk:
        raise GeometryError(
            f"{what} needs k={k} neighbours but there are only N={n} unique points and "
            f"maxk={settings.maxk} (usable k={maxk}); pass more points or lower that parameter."
        )
    return maxk


def _identity(x: np.ndarray) -> Dedup:
    rows = np.arange(len(x), dtype=np.int64)
    return Dedup(x, rows, rows)

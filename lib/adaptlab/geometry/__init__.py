"""Geometry of representations: exact kNN, intrinsic dimension, density peaks, overlaps.

- :mod:`~adaptlab.geometry.knn`: exact blockwise kNN in torch (CPU/GPU), duplicate removal;
- :mod:`~adaptlab.geometry.intrinsic_dim`: TwoNN and GRIDE, DADApy fed precomputed neighbours;
- :mod:`~adaptlab.geometry.clustering`: kNN density and ADP peaks, guarded against a DADApy bug;
- :mod:`~adaptlab.geometry.agreement`: ARI & co., label overlap, data overlap, linear probe;
- :mod:`~adaptlab.geometry.layer`: all of it for one layer (:func:`layer_metrics`).
"""

from __future__ import annotations

from adaptlab.geometry.agreement import (
    AGREEMENT_SCORES,
    data_overlap,
    label_agreement,
    label_overlap,
    probe_accuracy,
)
from adaptlab.geometry.clustering import (
    ADP_BACKENDS,
    Clusters,
    adp,
    broken_link_points,
    check_adp_labels,
    density_knn,
)
from adaptlab.geometry.intrinsic_dim import ID_ESTIMATORS, IdProfile, dadapy_data, gride, twonn
from adaptlab.geometry.knn import (
    Dedup,
    GeometryError,
    Neighbours,
    as_float64,
    knn,
    remove_duplicates,
)
from adaptlab.geometry.layer import MetricSettings, layer_metrics

__all__ = [
    "ADP_BACKENDS",
    "AGREEMENT_SCORES",
    "Clusters",
    "Dedup",
    "GeometryError",
    "ID_ESTIMATORS",
    "IdProfile",
    "MetricSettings",
    "Neighbours",
    "adp",
    "as_float64",
    "broken_link_points",
    "check_adp_labels",
    "dadapy_data",
    "data_overlap",
    "density_knn",
    "gride",
    "knn",
    "label_agreement",
    "label_overlap",
    "layer_metrics",
    "probe_accuracy",
    "remove_duplicates",
    "twonn",
]

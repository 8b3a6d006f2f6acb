"""Intrinsic dimension with DADApy's estimators, fed precomputed neighbours.

DADApy is used as a library, not re-implemented: :func:`dadapy_data` wraps the ``(dist, idx)``
of :func:`adaptlab.geometry.knn.knn` in a ``dadapy.Data`` (its precomputed-distances entry
point), and the estimators below call its methods. Fed the neighbours DADApy computes itself,
they return DADApy's numbers bit for bit.

Quick start::

    >>> import numpy as np
    >>> from adaptlab.geometry.knn import knn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2000, 3)) @ rng.normal(size=(3, 50))   # a 3-d plane in 50-d
    >>> data = dadapy_data(*knn(x, k=100))
    >>> round(twonn(data).ids[0], 1), round(gride(data, range_max=100).at(16), 1)
    (3.0, 3.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from dadapy import Data

from adaptlab.geometry.knn import GeometryError


@dataclass(frozen=True)
class IdProfile:
    """Intrinsic dimension at one or more neighbourhood scales.

    Attributes:
        ids: ``[S]`` ID estimate per scale.
        errors: ``[S]`` standard error per scale (0 where the estimator gives none).
        n1: ``[S]`` neighbour rank of each scale: the ID uses the distance ratio of neighbours
            ``n2 = 2 n1`` and ``n1`` (TwoNN: ``n1 = 1``).
        radii: ``[S]`` mean distance of the neighbours each estimate uses.
    """

    ids: np.ndarray
    errors: np.ndarray
    n1: np.ndarray
    radii: np.ndarray

    def at(self, n1: int) -> float:
        """The ID at scale ``n1``.

        Raises:
            GeometryError: the profile has no such scale.
        """
        hits = np.flatnonzero(self.n1 == n1)
        if not len(hits):
            raise GeometryError(
                f"the ID profile has scales n1 = {self.n1.tolist()}, not {n1}; "
                "pick one of them or widen the GRIDE range."
            )
        return float(self.ids[hits[0]])


def dadapy_data(dist: np.ndarray, idx: np.ndarray) -> Data:
    """A ``dadapy.Data`` on precomputed neighbours, ``Data(distances=(dist, idx), maxk=k)``.

    Args:
        dist: ``[N, k+1]`` float64 sorted distances, the point itself in column 0.
        idx: ``[N, k+1]`` int64 neighbour indices, the point itself in column 0.

    Raises:
        GeometryError: shapes or dtypes that DADApy would misread.
    """
    if dist.shape != idx.shape or dist.ndim != 2 or dist.shape[1] < 2:
        raise GeometryError(
            f"dist {dist.shape} and idx {idx.shape} must both be [N, k+1] with k >= 1; "
            "pass the output of knn()."
        )
    if not (np.issubdtype(idx.dtype, np.integer) and (idx[:, 0] == np.arange(len(idx))).all()):
        raise GeometryError("idx must be integer with each point itself in column 0; use knn().")
    dist = np.ascontiguousarray(dist, dtype=np.float64)
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    return Data(distances=(dist, idx), maxk=dist.shape[1] - 1, verbose=False, n_jobs=1)


def twonn(data: Data, mu_fraction: float = 0.9) -> IdProfile:
    """TwoNN (Facco et al. 2017): DADApy ``compute_id_2NN`` with its defaults.

    Args:
        data: DADApy data with at least 2 neighbours per point.
        mu_fraction: fraction of the ratios r2/r1 kept for the linear fit (largest dropped).

    Returns:
        A one-scale profile (``n1 = 1``).
    """
    dim, err, radius = data.compute_id_2NN(algorithm="base", mu_fraction=mu_fraction)
    return IdProfile(np.array([dim]), np.array([err]), np.array([1]), np.array([radius]))


def gride(data: Data, range_max: int = 100) -> IdProfile:
    """GRIDE scaling (Denti et al. 2022): DADApy ``return_id_scaling_gride(range_max)``.

    Scales double, ``n1 = 1, 2, 4, ...`` while ``2 n1 <= range_max``: ``range_max = 100`` gives
    6 scales, ``n1 = 1 ... 32``.

    Args:
        data: DADApy data with at least ``min(range_max, maxk)`` neighbours per point.
        range_max: largest neighbour rank used; clipped to the neighbours available.
    """
    range_max = min(range_max, data.maxk)
    if range_max < 2:
        raise GeometryError(f"GRIDE needs range_max >= 2 neighbours, got {range_max}.")
    ids, errors, radii = data.return_id_scaling_gride(range_max=range_max)
    n1 = 2 ** np.arange(len(ids))
    return IdProfile(np.asarray(ids), np.asarray(errors), n1, np.asarray(radii))


ID_ESTIMATORS: dict[str, Callable[..., IdProfile]] = {"twonn": twonn, "gride": gride}
"""Intrinsic-dimension estimators by name: ``fn(data, **options) -> IdProfile``."""

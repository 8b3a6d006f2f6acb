"""Exact k-nearest neighbours in torch, in tiles, on CPU or GPU, plus duplicate removal.

The result is what DADApy's precomputed-neighbour entry point takes,
``Data(distances=(dist, idx), maxk=k)``: float64 distances and int64 indices of shape
``[N, k+1]``, each row sorted by distance with the point itself in column 0 at distance 0.

The search scores ``|x_j|^2 - 2 x_i.x_j`` (``d^2`` less the row constant ``|x_i|^2``) from GEMMs
over tiles of the Gram matrix. The matrix is symmetric, so each pair of tiles is computed once
and serves both its rows and its columns: about 60% of the GEMM work of a row-block search.
Each row keeps a running top list, merged tile by tile, so memory is bounded by the tile size
(``block_size``), not by N. Two precisions, both exact up to ties (see :func:`knn`):

- ``float32``: float32 GEMMs give the top ``k + m`` candidates, whose distances are then
  recomputed in float64 from explicit differences and re-sorted. Each row is certified against
  a rigorous bound on the float32 rounding error; rows that fail (near-ties at the boundary)
  are searched again in float64.
- ``float64``: float64 GEMMs give the top ``k + 1`` (what scikit-learn's brute force, hence
  DADApy's ``compute_distances``, does); pairs prone to cancellation (``d^2 < 1e-4
  (|x_i|^2 + |x_j|^2)``) are recomputed from explicit differences.

The GEMMs run on centred data (distances do not change, cancellation does); explicit
differences use the data as given. ``search="auto"`` picks float64 where float64 GEMMs are fast
(CPUs, data-centre GPUs) and float32 elsewhere: see :func:`knn`.

Quick start::

    >>> import numpy as np
    >>> x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [3.0, 1.0]])
    >>> dist, idx = knn(x, k=2)
    >>> idx
    array([[0, 1, 2],
           [1, 0, 3],
           [2, 0, 1],
           [3, 1, 0]])
    >>> dist[0]
    array([0., 1., 3.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from adaptlab.errors import UserError

Search = Literal["auto", "float32", "float64"]

# Elements of float64 gathered per chunk when recomputing candidate distances (2 MiB: cache).
_PAIR_CHUNK = 2**18
# Pairs with d^2 below this fraction of |x_i|^2 + |x_j|^2 lose digits in the GEMM identity.
_CANCELLATION = 1e-4
_U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32


class GeometryError(UserError):
    """Bad input to a geometry metric (too few points, non-finite values, a bad option)."""


@dataclass(frozen=True)
class Dedup:
    """Unique rows of a representation, in order of first occurrence.

    Attributes:
        unique: ``[U, D]`` float64 unique rows, ``unique = x[kept]``.
        kept: ``[U]`` int64 index in the original rows of each unique row's first occurrence
            (increasing).
        inverse: ``[N]`` int64, ``x[i] == unique[inverse[i]]``.
    """

    unique: np.ndarray
    kept: np.ndarray
    inverse: np.ndarray

    @property
    def n_duplicates(self) -> int:
        """Rows dropped because they repeat an earlier row."""
        return len(self.inverse) - len(self.kept)


@dataclass(frozen=True)
class Neighbours:
    """Nearest neighbours of the unique rows of a representation, with the dedup maps.

    Attributes:
        dist: ``[U, k+1]`` float64 sorted distances, column 0 the point itself (0).
        idx: ``[U, k+1]`` int64 neighbour indices into the unique rows, column 0 the point.
        kept: ``[U]`` original row of each unique row (see :class:`Dedup`).
        inverse: ``[N]`` unique row of each original row.
    """

    dist: np.ndarray
    idx: np.ndarray
    kept: np.ndarray
    inverse: np.ndarray

    @property
    def k(self) -> int:
        """Neighbours per point, self excluded."""
        return self.idx.shape[1] - 1


def as_float64(x: np.ndarray | torch.Tensor, name: str = "x") -> np.ndarray:
    """``x`` as a C-contiguous float64 numpy array ``[N, D]``, checked to be finite.

    Args:
        x: ``[N, D]`` array or tensor of any real dtype (bf16 included), on any device.
        name: what to call ``x`` in error messages.

    Raises:
        GeometryError: ``x`` is not 2-D, is empty, or holds NaN/inf.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise GeometryError(f"{name} has shape {x.shape}; pass a non-empty [N, D] matrix.")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise GeometryError(f"{name} has {bad} rows with NaN or inf; drop or fix those rows.")
    return x


def remove_duplicates(x: np.ndarray | torch.Tensor) -> Dedup:
    """Drop rows identical to an earlier row, keeping first occurrences in original order.

    Identical points give zero neighbour distances, which break TwoNN and GRIDE (log 0).
    Rows are compared bit for bit after conversion to float64 (exact for every float dtype),
    with -0.0 and 0.0 treated as equal. A hash of a few columns settles the usual case (no
    duplicates) in one cheap pass; otherwise every row's bytes are compared.

    Args:
        x: ``[N, D]`` representation.

    Returns:
        The unique rows ``[U, D]`` and the maps between them and the original rows.
    """
    x = as_float64(x)
    if len(np.unique(_row_hashes(x))) == len(x):  # identical rows share a hash
        every = np.arange(len(x), dtype=np.int64)
        return Dedup(x, every, every)
    groups: dict[bytes, int] = {}
    # each row's group, numbered in order of first occurrence
    inverse = np.fromiter(
        (groups.setdefault((row + 0.0).tobytes(), len(groups)) for row in x), np.int64, len(x)
    )
    kept = np.unique(inverse, return_index=True)[1].astype(np.int64)
    return Dedup(x[kept], kept, inverse)


def _row_hashes(x: np.ndarray, n_columns: int = 64) -> np.ndarray:
    """``[N]`` uint64 hash of the bits of a fixed random subset of columns of each row.

    Exact integer arithmetic (wrapping modulo 2^64), so equal rows always agree; rows that
    differ only outside the subset collide and merely send :func:`remove_duplicates` to its
    exact, slower path. ``+ 0.0`` maps -0.0 to 0.0.
    """
    rng = np.random.default_rng(0)
    columns = np.sort(rng.permutation(x.shape[1])[:n_columns])
    odd = rng.integers(0, 2**63, size=len(columns), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    bits = np.ascontiguousarray(x[:, columns] + 0.0).view(np.uint64)
    return (bits * odd).sum(axis=1, dtype=np.uint64)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: the GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def knn(
    x: np.ndarray | torch.Tensor,
    k: int,
    block_size: int = 4096,
    device: str | torch.device | None = None,
    search: Search = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k-nearest neighbours of every row of ``x`` among the rows of ``x``.

    Args:
        x: ``[N, D]`` points, any real dtype; distances are those of the float64 values.
        k: neighbours per point, the point itself not counted (``k <= N - 1``).
        block_size: largest tile side; memory is about ``2 block_size^2`` scores plus the
            ``[N, k+1]`` results (tiles are smaller when N is small, to use the symmetry).
        device: where the GEMMs run (``None``/``"auto"``: GPU when available).
        search: ``float32`` (GEMM search in float32, candidates refined in float64),
            ``float64`` (GEMM search in float64) or ``auto``: float64 where float64 GEMMs are
            fast (CPUs, data-centre GPUs), else float32. Refining candidates reads
            ``N (k+m) D`` scattered float64 values, which costs more than the float64 GEMM
            saves unless float64 runs far slower than float32 (consumer GPUs: 1/32-1/64).

    Returns:
        ``dist`` ``[N, k+1]`` float64 and ``idx`` ``[N, k+1]`` int64, rows sorted by distance
        (equal distances by index), the point itself in column 0 at distance 0. Which of
        several points tied at the k-th distance makes the list is arbitrary.

    Raises:
        GeometryError: fewer than ``k + 1`` points, or a bad ``k``/``block_size``/``search``.
    """
    x64 = as_float64(x)
    n = x64.shape[0]
    if k < 1 or k > n - 1:
        raise GeometryError(
            f"knn with k={k} needs at least k + 1 = {k + 1} points but x has N={n}; "
            "lower k or pass more points."
        )
    if block_size < 1:
        raise GeometryError(f"block_size={block_size} must be a positive number of rows.")
    dev = resolve_device(device)
    if search == "auto":
        search = "float64" if _fast_float64(dev) else "float32"
    if search not in ("float32", "float64"):
        raise GeometryError(f"search={search!r} is not one of 'auto', 'float32', 'float64'.")
    pts = _Points.of(x64, dev)
    tile = _tile_size(n, block_size)
    with torch.no_grad():
        if search == "float32":
            d2, idx = _search_float32(pts, k, tile)
        else:
            d2, idx = _search_float64(pts, None, k, tile)
    dist = d2.sqrt_().cpu().numpy()
    return dist, idx.cpu().numpy().astype(np.int64, copy=False)


@dataclass(frozen=True)
class _Points:
    """The points twice: as given, for exact differences, and centred, for the GEMMs.

    Centring keeps ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` from cancelling when the data sit far
    from the origin; explicit differences need no centring, and lose digits with it.
    """

    x: torch.Tensor  # [N, D] float64 as given
    xc: torch.Tensor  # [N, D] float64, x minus its mean
    norms: torch.Tensor  # [N] squared norms of xc

    @classmethod
    def of(cls, x64: np.ndarray, device: torch.device) -> _Points:
        x = torch.from_numpy(x64).to(device)
        xc = x - x.mean(dim=0)
        return cls(x, xc, (xc * xc).sum(dim=1))


def _fast_float64(device: torch.device) -> bool:
    """CPUs and the data-centre GPUs (compute capability 6.0, 7.0, 8.0, 9.0, 10.0)."""
    if device.type != "cuda":
        return True
    major, minor = torch.cuda.get_device_capability(device)
    return minor == 0 and major >= 6


def _tile_size(n: int, block: int) -> int:
    """At least 4 tiles per side when N allows (the symmetry saves ~40% of the GEMMs)."""
    return min(block, max(512, -(-n // 4)))


def _search_tiles(
    x: torch.Tensor, norms: torch.Tensor, n_keep: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n_keep`` smallest scores of every row over all columns, self first (-inf).

    Args:
        x: ``[N, D]`` centred points in the search precision.
        norms: ``[N]`` squared norms, same dtype as ``x``.
        n_keep: scores kept per row.
        tile: tile side; memory is two ``[tile, tile]`` buffers plus the ``[N, n_keep]`` lists.

    Returns:
        Scores ``[N, n_keep]`` (unsorted) and their column indices.
    """
    n = len(x)
    best_v = torch.full((n, n_keep), torch.inf, dtype=x.dtype, device=x.device)
    best_i = torch.zeros((n, n_keep), dtype=torch.long, device=x.device)
    bounds = [(s, min(s + tile, n)) for s in range(0, n, tile)]
    gram = torch.empty(tile, tile, dtype=x.dtype, device=x.device)
    # [kept | new scores] side by side, so one topk merges them; reused across tiles because a
    # fresh array per tile costs page faults comparable to the topk itself.
    work = torch.empty(tile, n_keep + tile, dtype=x.dtype, device=x.device)
    for a, (i0, i1) in enumerate(bounds):
        for j0, j1 in bounds[a:]:
            g = torch.mm(x[i0:i1], x[j0:j1].T, out=gram[: i1 - i0, : j1 - j0])
            w = work[: i1 - i0, : n_keep + j1 - j0]
            torch.add(norms[None, j0:j1], g, alpha=-2.0, out=w[:, n_keep:])
            if i0 == j0:
                w[:, n_keep:].fill_diagonal_(-torch.inf)
            _merge(best_v, best_i, i0, w, j0)
            if j0 != i0:
                w = work[: j1 - j0, : n_keep + i1 - i0]
                torch.add(norms[None, i0:i1], g.T, alpha=-2.0, out=w[:, n_keep:])
                _merge(best_v, best_i, j0, w, i0)
    return best_v, best_i


def _search_rows(
    x: torch.Tensor, norms: torch.Tensor, rows: torch.Tensor, n_keep: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`_search_tiles` for a subset of rows ``[R]`` (each scored against all N)."""
    n = len(x)
    step = max(1, tile * tile // n)  # the same memory as one tile
    vals, cand = [], []
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        scores = torch.addmm(norms[None, :], x[r], x.T, alpha=-2.0)
        scores[torch.arange(len(r), device=x.device), r] = -torch.inf
        v, c = torch.topk(scores, n_keep, dim=1, largest=False, sorted=False)
        vals.append(v)
        cand.append(c)
    return torch.cat(vals), torch.cat(cand)


def _merge(best_v: torch.Tensor, best_i: torch.Tensor, r0: int, w: torch.Tensor, c0: int) -> None:
    """Fold new scores into the top lists of rows ``r0 ...``.

    ``w`` is ``[rows, n_keep + cols]``: its first ``n_keep`` columns are overwritten with the
    current lists, the rest hold the scores against columns ``c0 ...``.
    """
    keep = best_v.shape[1]
    r1 = r0 + len(w)
    w[:, :keep] = best_v[r0:r1]
    v, j = torch.topk(w, keep, dim=1, largest=False, sorted=False)
    old = best_i[r0:r1].gather(1, j.clamp(max=keep - 1))
    best_i[r0:r1] = torch.where(j < keep, old, j + (c0 - keep))
    best_v[r0:r1] = v


def _search_float64(
    pts: _Points, rows: torch.Tensor | None, k: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances ``[R, k+1]`` and indices of the neighbours of ``rows`` (all: None)."""
    norms = pts.norms
    if rows is None:
        rows = torch.arange(len(norms), device=norms.device)
        vals, cand = _search_tiles(pts.xc, norms, k + 1, tile)
    else:
        vals, cand = _search_rows(pts.xc, norms, rows, k + 1, tile)
    d2 = (vals + norms[rows, None]).clamp_min_(0.0)
    prone = d2 < _CANCELLATION * (norms[rows, None] + norms[cand])
    prone &= cand != rows[:, None]
    if prone.any():
        i, j = prone.nonzero(as_tuple=True)
        d2[i, j] = _pair_d2(pts.x, rows[i], cand[i, j])
    return _sort_self_first(d2, cand, rows)


def _search_float32(pts: _Points, k: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 candidate search, float64 refinement, float64 re-search of uncertified rows."""
    n, d = pts.x.shape
    n_cand = min(n, k + 1 + max(16, k // 8))  # a margin beyond k so the boundary can be proven
    vals, cand = _search_tiles(pts.xc.float(), pts.norms.float(), n_cand, tile)
    rows = torch.arange(n, device=pts.x.device)
    d2, cand = _sort_self_first(_rows_d2(pts.x, rows, cand), cand, rows)
    d2, cand = d2[:, : k + 1].contiguous(), cand[:, : k + 1].contiguous()
    if n_cand < n:
        # |score_float32 + |x_i|^2 - d2| <= (D + 8) u (|x_i| + max_j |x_j|)^2: the rounding of
        # inputs and norms to float32 and the GEMM's accumulation (gamma_D times the sum of
        # |terms| <= 2 |x_i||x_j|) and bias addition. Every non-candidate's score is >= the
        # largest kept score, so its true d2 is >= floor; the k-th neighbour must not exceed it.
        radii = pts.norms.sqrt()
        bound = (d + 8) * _U32 * (radii + radii.max()) ** 2
        floor = vals.max(dim=1).values.double() + pts.norms - bound
        redo = rows[d2[:, k] > floor]
        if len(redo):
            d2[redo], cand[redo] = _search_float64(pts, redo, k, tile)
    return d2, cand


def _rows_d2(x: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Float64 ``|x_row - x_cand|^2`` ``[R, C]`` from explicit differences, in chunks of rows."""
    out = torch.empty(cand.shape, dtype=torch.float64, device=x.device)
    d = x.shape[1]
    step = max(1, _PAIR_CHUNK // (cand.shape[1] * d))
    for s in range(0, len(rows), step):
        diff = x.index_select(0, cand[s : s + step].reshape(-1)).view(-1, cand.shape[1], d)
        diff -= x[rows[s : s + step], None, :]
        out[s : s + step] = diff.square_().sum(dim=-1)
    return out


def _pair_d2(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Float64 ``|x_i - x_j|^2`` for index pairs ``[P]``, from explicit differences."""
    out = torch.empty(len(i), dtype=torch.float64, device=x.device)
    step = max(1, _PAIR_CHUNK // x.shape[1])
    for s in range(0, len(i), step):
        out[s : s + step] = (x[i[s : s + step]] - x[j[s : s + step]]).square_().sum(dim=-1)
    return out


def _sort_self_first(
    d2: torch.Tensor, cand: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (distance, index), the point itself first at distance 0."""
    d2, order = torch.sort(d2.masked_fill(cand == rows[:, None], -1.0), dim=1)
    cand = cand.gather(1, order)
    tied = (d2[:, 1:] == d2[:, :-1]).any(dim=1).nonzero().flatten()
    if len(tied):  # rare: order equal distances by index, as a stable sort of index-sorted rows
        by_index = torch.argsort(cand[tied], dim=1)
        t_d2, t_cand = d2[tied].gather(1, by_index), cand[tied].gather(1, by_index)
        order = torch.sort(t_d2, dim=1, stable=True).indices
        d2[tied], cand[tied] = t_d2.gather(1, order), t_cand.gather(1, order)
    return d2.clamp_min_(0.0), cand

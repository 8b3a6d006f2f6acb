"""Random-projection kernels for models too large for exact kernels (7B scale).

Each example's gradient J_c(x) ``[P]`` is mapped to φ_c(x) = Rᵀ J_c(x) ``[d]`` with a seeded
random R ``[P, d]`` of entries of variance 1/d, so E[φ_c(x_i)·φ_c'(x_j)] = K[i, c, j, c']
(Johnson-Lindenstrauss): the kernel of N examples then costs N·C·d numbers, not N·C·P. R is
never held whole: it is generated in chunks of parameter rows from a seed derived from
(``seed``, parameter name, chunk), so the same R is drawn for every batch and call, and only
the chunks holding rows some example touches are drawn::

    phi_train = projected_features(fn, params, train_batches, dim=4096, seed=0)
    phi_test = projected_features(fn, params, test_batches, dim=4096, seed=0)
    K = projected_kernel(phi_train, phi_test)  # ≈ compute_kernel(..., "sgd")

``sign=True`` projects sign J instead (SignGD kernels: project both sides with signs;
A-SignGD: signs on the training side only). Generating R costs P·d numbers per batch, so use
large batches.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from adaptlab.ntk.errors import KernelError
from adaptlab.ntk.function import KernelFunction
from adaptlab.ntk.per_example import Capturer

Sampler = Callable[[tuple[int, int], torch.Generator, torch.dtype, torch.device], Tensor]

PROJECTIONS: dict[str, Sampler] = {
    "gaussian": lambda shape, gen, dtype, device: torch.randn(
        shape, generator=gen, dtype=dtype, device=device
    ),
    "rademacher": lambda shape, gen, dtype, device: (
        torch.randint(0, 2, shape, generator=gen, device=device).to(dtype) * 2 - 1
    ),
}

_CHUNK_NUMEL = 2**22  # entries of R drawn at once


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def projected_features(
    fn: KernelFunction,
    params: Mapping[str, Tensor],
    batches: Sequence[Mapping[str, Any]],
    dim: int,
    *,
    seed: int = 0,
    distribution: Literal["gaussian", "rademacher"] = "gaussian",
    sign: bool = False,
    progress: bool = False,
    desc: str = "projection",
) -> Tensor:
    """Per-example gradients projected to ``dim`` random directions.

    Args:
        fn: the function f(x) ``[B, C]``.
        params: the parameters to differentiate.
        batches: batches of the N examples.
        dim: d, the number of random directions.
        seed: seed of R; use the same one for the two sides of a kernel.
        distribution: entries of R, a key of :data:`PROJECTIONS` (scaled by 1/sqrt(d)).
        sign: project sign J instead of J.
        progress: show a progress bar over batches.
        desc: the progress bar's label.

    Returns:
        ``[N, C, d]`` float64 features on the CPU.

    Raises:
        KernelError: a bad ``dim``, an unknown distribution, or no batches.
    """
    if dim < 1:
        raise KernelError(f"dim={dim} gives no projection; use a positive number of directions.")
    if distribution not in PROJECTIONS:
        raise KernelError(
            f"Unknown projection {distribution!r}; choose from {', '.join(PROJECTIONS)}."
        )
    if not batches:
        raise KernelError("projected_features got no batches; pass at least one.")
    sample = PROJECTIONS[distribution]
    capture = Capturer(fn, list(params))
    first = next(iter(params.values()))
    acc = torch.promote_types(first.dtype, torch.float32)
    scale = 1 / math.sqrt(dim)
    features = []
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        side = capture(params, batch)
        n_rows_out = side.n_outputs * side.batch_size
        phi = torch.zeros(n_rows_out, dim, dtype=acc, device=first.device)
        for name in side.uses:
            n_rows, row_numel = side.shapes[name]
            touched = side.touched(name)
            chunk = max(1, _CHUNK_NUMEL // max(row_numel * dim, 1))
            for index, start in enumerate(range(0, n_rows, chunk)):
                stop = min(start + chunk, n_rows)
                if touched is None:
                    rows, local = slice(start, stop), slice(None)
                else:
                    rows = touched[(touched >= start) & (touched < stop)]
                    if len(rows) == 0:
                        continue
                    local = rows - start
                gen = torch.Generator(first.device).manual_seed(_chunk_seed(seed, name, index))
                r = sample(((stop - start) * row_numel, dim), gen, acc, first.device)
                r = r.view(stop - start, row_numel, dim)[local].reshape(-1, dim)
                grads = side.materialize(name, rows).reshape(n_rows_out, -1).to(acc)
                phi += (grads.sign() if sign else grads) @ r
        features.append((phi * scale).view(side.n_outputs, side.batch_size, dim).transpose(0, 1))
    return torch.cat(features).to(device="cpu", dtype=torch.float64)


def projected_kernel(phi_rows: Tensor, phi_cols: Tensor) -> Tensor:
    """K[i, c, j, c'] = φ_c(x_i)·φ_c'(x_j) from projected features.

    Args:
        phi_rows: ``[N, C, d]`` features of the rows (training set).
        phi_cols: ``[M, C, d]`` features of the columns.

    Returns:
        ``[N, C, M, C]`` float64 kernel.
    """
    if phi_rows.shape[-1] != phi_cols.shape[-1]:
        raise KernelError(
            f"Features of dims {phi_rows.shape[-1]} and {phi_cols.shape[-1]} do not match; "
            "project both sides with the same dim and seed."
        )
    return torch.einsum("icd,jed->icje", phi_rows.double(), phi_cols.double())

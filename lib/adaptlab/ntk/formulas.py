"""eNTK formulas (kernel.md §6-§7): K[i, c, j, c'] from per-example gradients, block by block.

J(x) = ∂f(x)/∂θ ``[C, P]``; rows i are training examples, columns j any set X.

| formula              | K[i, c, j, c']                     |
|----------------------|------------------------------------|
| ``sgd``                | ⟨J_c(x_i), J_c'(x_j)⟩              |
| ``signgd``             | ⟨sign J_c(x_i), sign J_c'(x_j)⟩    |
| ``asymmetric_signgd``  | ⟨sign J_c(x_i), J_c'(x_j)⟩ (A-SignGD, Adam) |

How it is computed (:mod:`adaptlab.ntk.per_example` gives the gradients):

- per batch, one forward and C backward passes give every example's gradient factors
  (inputs and output gradients of each layer); upstream's ``jacrev`` of a batch output
  back-propagates all B·C rows through the whole batch, B times the work. Factors of as many
  batches as fit ~2^28 numbers are kept, so with all columns in that budget every batch
  runs once (otherwise the row batches rerun once per group of columns);
- parameters are walked in blocks of at most ``param_block_numel`` entries: the per-example
  gradients of a block are materialised for every kept batch into one matrix per side,
  ``[C·examples, block]``, transformed (sign) and contracted by one matrix product, then
  freed: ``[N, P]`` is never held. Rows that no example of one side touches (embedding rows
  of absent tokens, decoder rows of other label words) are skipped: their gradient is zero
  there and sign(0) = 0;
- for ``sgd`` a linear layer may skip the per-example weight gradients altogether:
  ⟨Σ_t δ_it a_itᵀ, Σ_s δ_js a_jsᵀ⟩ = Σ_{t,s} (a_it·a_js)(δ_it·δ_js), chosen per layer when it
  costs fewer operations (few tokens against wide layers, e.g. a head read at one position);
- with the same batches on both axes, symmetric formulas compute the upper block triangle
  only and mirror it;
- products are taken in the model's precision (at least float32) and every block is summed
  into a float64 kernel; sign products of a block are integers, exact in float32 up to
  2^24 entries, so blocks of sign formulas stay below that.

Example::

    fn = KernelFunction(model, head="label_words", label_word_ids=[17, 42])
    params = select_parameters(model)
    K = compute_kernel(fn, params, train_batches, test_batches, "sgd", progress=True)
    K.shape  # [N_train, 2, N_test, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from adaptlab.ntk.errors import KernelError
from adaptlab.ntk.function import KernelFunction
from adaptlab.ntk.per_example import Capturer, PerExampleGradients, Rows

Batch = Mapping[str, Any]
Transform = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


# formula -> (transform of the row-side gradient, transform of the column-side gradient)
FORMULAS: dict[str, tuple[Transform, Transform]] = {
    "sgd": (_identity, _identity),
    "signgd": (torch.sign, torch.sign),
    "asymmetric_signgd": (torch.sign, _identity),
}

_EXACT_SIGN_BLOCK = 2**24  # integers up to 2^24 are exact in float32
_BLOCK_BUDGET = 2**27  # default: entries of per-example gradients held at once
_FACTOR_BUDGET = 2**28  # numbers of gradient factors (activations, δ) kept across batches
_ALONE = 2**15  # segments this large are contracted alone


def get_formula(name: str) -> tuple[Transform, Transform]:
    """The (row, column) gradient transforms of formula ``name``.

    Raises:
        KernelError: an unknown formula, listing the choices.
    """
    if name not in FORMULAS:
        raise KernelError(f"Unknown kernel formula {name!r}; choose from {', '.join(FORMULAS)}.")
    return FORMULAS[name]


def compute_kernel(
    fn: KernelFunction,
    params: Mapping[str, Tensor],
    rows: Sequence[Batch],
    cols: Sequence[Batch],
    formula: str,
    *,
    param_block_numel: int | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    desc: str = "kernel",
    gram: bool | None = None,
) -> Tensor:
    """The eNTK of ``fn`` between two sets of examples.

    Args:
        fn: the function f(x) ``[B, C]``.
        params: the parameters to differentiate (:func:`~adaptlab.ntk.params.select_parameters`).
        rows: batches of the row examples (training set), N examples in all.
        cols: batches of the column examples, M in all; pass ``rows`` itself for the
            train-train kernel (symmetric formulas then compute half the blocks).
        formula: a key of :data:`FORMULAS`.
        param_block_numel: bounds the per-example gradients held at once to
            ``(B_rows + B_cols)·C·param_block_numel`` numbers (B: batch sizes; blocks narrow
            when several batches are kept); ``None`` holds up to ~2^27 numbers.
        dtype: dtype of the returned kernel (blocks are summed in float64).
        progress: show a progress bar over kernel blocks (row batch x column batch).
        desc: the progress bar's label.
        gram: for ``sgd``, contract linear layers through token Gram matrices (``True``),
            through per-example weight gradients (``False``), or whichever is cheaper
            per layer (``None``).

    Returns:
        ``[N, C, M, C]`` kernel on the CPU.

    Raises:
        KernelError: an unknown formula, no parameters or no batches.
    """
    transforms = [get_formula(formula)]
    return _kernels(
        fn, params, rows, cols, transforms, param_block_numel, dtype, progress, desc, gram
    )[0]


def asymmetric_pair(
    fn: KernelFunction,
    params: Mapping[str, Tensor],
    train_batches: Sequence[Batch],
    x_batches: Sequence[Batch],
    *,
    param_block_numel: int | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    desc: str = "kernel",
) -> Tensor:
    """A-SignGD kernel and its flipped kernel, stacked as upstream saves them.

    K[i, c, j, c'] = ⟨sign J_c(x_i), J_c'(x_j)⟩ and K'[i, c, j, c'] = ⟨J_c(x_i), sign J_c'(x_j)⟩
    for training examples i and examples j of X. Both come from the same per-example
    gradients; for X = train, K' is K permuted (2, 3, 0, 1).

    Args:
        fn, params, param_block_numel, dtype, progress, desc: as :func:`compute_kernel`.
        train_batches: batches of the N training examples.
        x_batches: batches of the M examples of X (``train_batches`` itself for X = train).

    Returns:
        ``[2, N, C, M, C]``: K then K'.
    """
    if _same_batches(train_batches, x_batches):
        kernel = compute_kernel(
            fn,
            params,
            train_batches,
            x_batches,
            "asymmetric_signgd",
            param_block_numel=param_block_numel,
            dtype=dtype,
            progress=progress,
            desc=desc,
        )
        return torch.stack([kernel, kernel.permute(2, 3, 0, 1)])
    transforms = [FORMULAS["asymmetric_signgd"], (_identity, torch.sign)]
    kernels = _kernels(
        fn,
        params,
        train_batches,
        x_batches,
        transforms,
        param_block_numel,
        dtype,
        progress,
        desc,
        False,
    )
    return torch.stack(kernels)


def _same_batches(a: Sequence[Batch], b: Sequence[Batch]) -> bool:
    return a is b or (len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True)))


def _offsets(batches: Sequence[Batch]) -> list[int]:
    out = [0]
    for batch in batches:
        out.append(out[-1] + batch["input_ids"].shape[0])
    return out


def _kernels(
    fn: KernelFunction,
    params: Mapping[str, Tensor],
    rows: Sequence[Batch],
    cols: Sequence[Batch],
    transforms: list[tuple[Transform, Transform]],
    param_block_numel: int | None,
    dtype: torch.dtype,
    progress: bool,
    desc: str,
    gram: bool | None,
) -> list[Tensor]:
    """One kernel per (row transform, column transform), sharing every gradient.

    Batches are gathered into groups whose gradient factors fit :data:`_FACTOR_BUDGET`;
    for each (row group, column group) every batch's factors are computed once and every
    block of parameters is materialised once per batch. Column groups are the outer loop, so
    when all columns fit in one group nothing is computed twice.
    """
    if not params:
        raise KernelError("No parameters to differentiate; pass select_parameters(model).")
    if not rows or not cols:
        raise KernelError("compute_kernel got no batches; pass at least one row and column batch.")
    capture = Capturer(fn, list(params))
    row_at, col_at = _offsets(rows), _offsets(cols)
    same = _same_batches(rows, cols)
    symmetric = same and all(t_row is t_col for t_row, t_col in transforms)
    signs = any(t is torch.sign for pair in transforms for t in pair)
    first = capture(params, rows[0])
    n_out = first.n_outputs
    per_example = max(1, first.factor_numel() // first.batch_size)
    row_groups = _groups(rows, _FACTOR_BUDGET // 2 // per_example)
    col_groups = row_groups if same else _groups(cols, _FACTOR_BUDGET // 2 // per_example)
    kernels = [torch.zeros(row_at[-1], n_out, col_at[-1], n_out, dtype=dtype) for _ in transforms]
    batch_sizes = max(_sizes(rows)) + max(_sizes(cols))
    n_pairs = len(rows) * (len(rows) + 1) // 2 if symmetric else len(rows) * len(cols)
    bar = tqdm(total=n_pairs, desc=desc, unit="block", disable=not progress, smoothing=0)
    cached = {id(rows[0]): first}  # measured the factors' size; used once

    def sides(batches: Sequence[Batch], group: list[int]) -> dict[int, PerExampleGradients]:
        return {i: cached.pop(id(batches[i]), None) or capture(params, batches[i]) for i in group}

    try:
        for gc, col_group in enumerate(col_groups):
            col_sides: dict[int, PerExampleGradients] = {}
            for gr, row_group in enumerate(row_groups):
                if symmetric and gr > gc:
                    continue
                col_sides = col_sides or sides(cols, col_group)
                row_sides = col_sides if same and gr == gc else sides(rows, row_group)
                pairs = [
                    (r, c)
                    for r in row_group
                    for c in col_group
                    if not (symmetric and gr == gc and c < r)
                ]
                block = _block_width(row_sides, col_sides, n_out, param_block_numel, batch_sizes)
                if signs and _contract_dtype(params) == torch.float32:
                    block = min(block, _EXACT_SIGN_BLOCK)
                parts = _group_kernels(
                    row_sides,
                    col_sides,
                    pairs,
                    same,
                    transforms,
                    block,
                    gram,
                    params,
                    bar,
                )
                for (r, c), blocks in parts.items():
                    rs, cs = slice(row_at[r], row_at[r + 1]), slice(col_at[c], col_at[c + 1])
                    for kernel, part in zip(kernels, blocks, strict=True):
                        kernel[rs, :, cs] = part
                        if symmetric and c != r:
                            kernel[cs, :, rs] = part.permute(2, 3, 0, 1)
    finally:
        bar.close()
    return kernels


def _groups(batches: Sequence[Batch], max_examples: int) -> list[list[int]]:
    """Consecutive batch indices, at most ``max_examples`` examples a group (>= one batch)."""
    groups: list[list[int]] = [[]]
    count = 0
    for i, batch in enumerate(batches):
        size = batch["input_ids"].shape[0]
        if groups[-1] and count + size > max_examples:
            groups.append([])
            count = 0
        groups[-1].append(i)
        count += size
    return groups


def _sizes(batches: Sequence[Batch]) -> list[int]:
    return [batch["input_ids"].shape[0] for batch in batches]


def _block_width(
    row_sides: dict[int, PerExampleGradients],
    col_sides: dict[int, PerExampleGradients],
    n_out: int,
    param_block_numel: int | None,
    batch_sizes: int,
) -> int:
    """Parameter entries per block for the kept batches.

    ``param_block_numel`` promises ``(B_rows + B_cols)·C·param_block_numel`` numbers of
    per-example gradients (B: the largest batches); with more batches kept the block
    narrows to keep that promise. Without it, ~2^27 numbers are held.
    """
    held = sum(s.batch_size for s in row_sides.values())
    held += sum(s.batch_size for i, s in col_sides.items() if row_sides.get(i) is not s)
    if param_block_numel is not None:
        return max(1, param_block_numel * batch_sizes // held)
    return max(2**16, _BLOCK_BUDGET // (held * n_out))


def _contract_dtype(params: Mapping[str, Tensor]) -> torch.dtype:
    """float32 for float32 and lower-precision models, float64 for float64 ones."""
    return torch.promote_types(next(iter(params.values())).dtype, torch.float32)


def _union(sides: list[PerExampleGradients], name: str) -> Tensor | None:
    """Rows some side touches (``None``: all rows)."""
    found = [side.touched(name) for side in sides if name in side.uses]
    if any(rows is None for rows in found):
        return None
    return torch.cat(found).unique()


def _intersect(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a[torch.isin(a, b)]


def _group_kernels(
    row_sides: dict[int, PerExampleGradients],
    col_sides: dict[int, PerExampleGradients],
    pairs: list[tuple[int, int]],
    same: bool,
    transforms: list[tuple[Transform, Transform]],
    block_numel: int,
    gram: bool | None,
    params: Mapping[str, Tensor],
    bar: tqdm,
) -> dict[tuple[int, int], list[Tensor]]:
    """Kernels ``[B_r, C, B_c, C]`` of every (row batch, column batch) pair of a group.

    Per block of parameters, the per-example gradients of all the group's row batches are
    stacked into one matrix ``[Σ C·B_r, block]`` (and the columns' likewise), so one matrix
    product gives the block's share of every pair. Rows no batch of one side touches are
    skipped. ``bar`` advances by the pairs' share after each block.
    """
    acc = _contract_dtype(params)
    n_out = next(iter(row_sides.values())).n_outputs
    diagonal = same and row_sides is col_sides
    row_at = _stack_offsets(row_sides)
    col_at = row_at if diagonal else _stack_offsets(col_sides)
    # class-major rows (output c, example b) per batch: materialised gradients are [C, B, ...]
    device = next(iter(row_sides.values())).device
    out = [
        torch.zeros(row_at[None], col_at[None], dtype=torch.float64, device=device)
        for _ in transforms
    ]
    plain = len(transforms) == 1 and transforms[0] == FORMULAS["sgd"]
    lefts, rights = list(row_sides.values()), list(col_sides.values())
    segments: list[tuple[str, Rows, int]] = []
    for name, (n_rows, row_numel) in lefts[0].shapes.items():
        if not any(name in s.uses for s in lefts) or not any(name in s.uses for s in rights):
            continue  # zero gradient on one side
        rows = _intersect(_union(lefts, name), _union(rights, name))
        if rows is not None and len(rows) == 0:
            continue
        width = n_rows if rows is None else len(rows)
        if plain and _use_gram(row_sides, col_sides, pairs, name, width, block_numel, gram):
            index = slice(None) if rows is None else rows
            for r, c in pairs:
                if name in row_sides[r].uses and name in col_sides[c].uses:
                    part = _gram(row_sides[r], col_sides[c], name, index)
                    out[0][row_at[r], col_at[c]] += part.flatten(0, 1).flatten(1).double()
            continue
        step = max(1, block_numel // max(row_numel, 1))
        for start in range(0, width, step):
            stop = min(start + step, width)
            chunk = slice(start, stop) if rows is None else rows[start:stop]
            segments.append((name, chunk, (stop - start) * row_numel))
    blocks = _pack(segments, block_numel)
    for block in blocks:
        left = _stacked_gradients(row_sides, block, acc)
        right = left if diagonal else _stacked_gradients(col_sides, block, acc)
        for kernel, (t_r, t_c) in zip(out, transforms, strict=True):
            moved = t_r(left)
            kernel += (moved @ (moved if diagonal and t_c is t_r else t_c(right)).T).double()
        del left, right
        bar.update(len(pairs) / len(blocks))
    if not blocks:
        bar.update(len(pairs))
    return {
        (r, c): [
            k[row_at[r], col_at[c]]
            .view(n_out, row_sides[r].batch_size, n_out, col_sides[c].batch_size)
            .permute(1, 0, 3, 2)
            for k in out
        ]
        for r, c in pairs
    }


def _stack_offsets(sides: dict[int, PerExampleGradients]) -> dict[int | None, Any]:
    """Rows of each batch in a stacked matrix (``slice``), and the total under ``None``."""
    at: dict[int | None, Any] = {}
    start = 0
    for i, side in sides.items():
        stop = start + side.n_outputs * side.batch_size
        at[i] = slice(start, stop)
        start = stop
    at[None] = start
    return at


def _pack(segments: list[tuple[str, Rows, int]], block_numel: int) -> list[list]:
    """Blocks of at most ``block_numel`` entries: large segments alone (no copy), small ones
    (biases, norms) grouped so that one product covers many."""
    blocks: list[list] = []
    current: list = []
    size = 0
    for seg in segments:
        if seg[2] >= _ALONE:
            blocks.append([seg])
            continue
        if current and size + seg[2] > block_numel:
            blocks.append(current)
            current, size = [], 0
        current.append(seg)
        size += seg[2]
    if current:
        blocks.append(current)
    return blocks


def _stacked_gradients(
    sides: dict[int, PerExampleGradients], block: list[tuple[str, Rows, int]], acc: torch.dtype
) -> Tensor:
    """``[Σ C·B, block]`` per-example gradients of one block's rows for a group of batches."""
    first = next(iter(sides.values()))
    height = sum(s.n_outputs * s.batch_size for s in sides.values())
    width = sum(numel for _, _, numel in block)
    out = torch.empty(height, width, dtype=acc, device=first.device)
    top = 0
    for side in sides.values():
        bottom = top + side.n_outputs * side.batch_size
        left = 0
        for name, rows, numel in block:
            target = out[top:bottom, left : left + numel]
            if name in side.uses:
                side.materialize_into(name, rows, target)
            else:  # this batch does not use the parameter
                target.zero_()
            left += numel
        top = bottom
    return out


def _use_gram(
    row_sides: dict[int, PerExampleGradients],
    col_sides: dict[int, PerExampleGradients],
    pairs: list[tuple[int, int]],
    name: str,
    width: int,
    block_numel: int,
    gram: bool | None,
) -> bool:
    """Whether the token-Gram route is taken for a linear weight (``width`` output rows)."""
    if gram is False:
        return False
    sides = list(row_sides.values()) + list(col_sides.values())
    factors = [s.linear_factors(name) for s in sides if name in s.uses]
    if any(f is None for f in factors):
        return False
    if gram:
        return True
    n_out = sides[0].n_outputs
    d_in = factors[0][0][0].shape[-1]

    def tokens(side: PerExampleGradients) -> int:  # example-tokens of a batch
        return sum(a.shape[0] * a.shape[1] for a, _ in side.linear_factors(name) or [])

    gram_cost = memory = dense_cost = 0
    for r, c in pairs:
        t_r, t_c = tokens(row_sides[r]), tokens(col_sides[c])
        gram_cost += t_r * t_c * (d_in + n_out**2 * width)
        memory = max(memory, t_r * t_c * n_out**2)
        dense_cost += row_sides[r].batch_size * col_sides[c].batch_size * n_out**2 * width * d_in
    once = {id(s): s for s in sides}.values()
    dense_cost += sum(tokens(s) for s in once) * n_out * width * d_in
    held = sum(s.batch_size for s in once) * n_out * block_numel
    return gram_cost < dense_cost and memory <= held


def _gram(
    side_r: PerExampleGradients, side_c: PerExampleGradients, name: str, rows: Rows
) -> Tensor:
    """Σ_{t,s} (a_it·a_js)(δ_itc·δ_jsc') over the uses on both sides, ``[C, B_r, C, B_c]``."""
    total = None
    for a_r, d_r in side_r.linear_factors(name):
        for a_c, d_c in side_c.linear_factors(name):
            tokens = torch.einsum("bti,jsi->btjs", a_r, a_c)
            outs = torch.einsum("cbto,djso->cbtdjs", d_r[..., rows], d_c[..., rows])
            part = torch.einsum("btjs,cbtdjs->cbdj", tokens, outs)
            total = part if total is None else total + part
    return total

"""Grafting a model sharded with FSDP2: θ_pre, θ_ft, b and S per shard, the exact global patch.

Under ``accelerate launch --config_file accelerate_configs/fsdp.yaml`` the eligible parameters
are ``DTensor`` shards along dim 0 (:func:`adaptlab.training.parallel.shard_fsdp`): rank r of W
holds rows ``[r·c, min((r + 1)·c, n₀))`` with c = ⌈n₀ / W⌉. Everything of graft.md §3–§5 is
then computed on those rows, and a run over W processes gives the one-process result:

| step              | what each rank does                                    | communication      |
|-------------------|--------------------------------------------------------|--------------------|
| θ_pre, θ_ft       | keeps its rows (θ_ft read row-sliced, see below)       | none               |
| S init            | draws every whole S in tensor order, keeps its rows    | none               |
| patch (top-k)     | its k largest magnitudes of Δ, counts at the threshold | k values, T counts |
| mask gradient     | every W-th batch; FSDP2 reduce-scatters ∂L/∂θ          | FSDP's own         |
| S update          | on its rows                                            | none               |
| saving, hashes    | mask positions, Δ there, S tensor by tensor to rank 0  | k entries, S once  |

The patch is exact without gathering Δ: the k-th largest |Δ| is among the union of every rank's
k largest, and the entries equal to it are taken in global position order (tensor order, then
the ranks' row blocks in rank order, then flat order within a block, which for dim-0 shards is
the flat order of the whole tensor) from the all-gathered per-rank tie counts.

θ_ft is given as a mapping name → whole tensor (every rank then holds what the mapping holds;
a lazy mapping is fine) or as a function ``(name, rows) -> those rows of θ_ft``, e.g.
:func:`safetensors_rows`, with which each rank reads only its own rows from disk.

Every function here takes the whole-tensor path when ``tensors.mesh`` is None, so a recipe calls
the same functions under ``python`` and under an FSDP launch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from adaptlab.graft.artefact import hash_positions, hash_update, write_mask
from adaptlab.graft.errors import GraftError
from adaptlab.graft.patch import take_top, tie_quota, top_candidates
from adaptlab.graft.tensors import GraftTensors, local, score_dtype

Finetuned = Mapping[str, Tensor] | Callable[..., Tensor]
"""θ_ft: name → whole tensor, or ``(name, rows) -> those dim-0 rows`` of it (``(name)`` -> the
whole tensor when the model is not sharded)."""


def shard_rows(param: Tensor) -> slice:
    """The dim-0 rows of the whole tensor that this rank holds (all rows when not sharded).

    Raises:
        GraftError: a DTensor not sharded along dim 0 over a one-dimensional mesh.
    """
    if not isinstance(param, DTensor):
        return slice(0, param.shape[0])
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise GraftError(
            f"A parameter is sharded as {param.placements} over a {param.device_mesh.ndim}-D "
            "mesh; grafting supports FSDP2's dim-0 shards over one mesh dimension."
        )
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    if tuple(shape) != tuple(param.to_local().shape):
        raise GraftError(
            f"A parameter's local shard is {tuple(param.to_local().shape)}, not the dim-0 chunk "
            f"{tuple(shape)}; grafting supports FSDP2's even dim-0 chunks."
        )
    return slice(offset[0], offset[0] + shape[0])


def flat_offset(param: Tensor) -> int:
    """Where this rank's shard starts in the flat order of the whole tensor."""
    if not isinstance(param, DTensor):
        return 0
    return shard_rows(param).start * math.prod(param.shape[1:])


def own_rows(whole: Tensor, param: Tensor) -> Tensor:
    """This rank's rows of ``whole``, a tensor shaped like the whole ``param``."""
    return whole[shard_rows(param)] if isinstance(param, DTensor) else whole


def collect_sharded(
    model: nn.Module, names: Sequence[str], finetuned: Finetuned, *, on_device: bool = True
) -> GraftTensors:
    """θ_pre (the model's current shards) and this rank's rows of θ_ft; b = 0, S = 0.

    Args:
        model: the pretrained model sharded with FSDP2, holding θ_pre.
        names: eligible parameter names.
        finetuned: θ_ft, whole tensors or a row reader (:data:`Finetuned`).
        on_device: keep the copies on the model's device (else in host memory).

    Raises:
        GraftError: an unknown name, an eligible parameter left whole in a sharded model, shards
            on different meshes, or θ_ft rows of the wrong shape.
    """
    params = dict(model.named_parameters())
    unknown = [name for name in names if name not in params]
    if unknown:
        raise GraftError(f"{unknown[0]!r} is not a parameter of the model; pass eligible names.")
    chosen = [params[name] for name in names]
    meshes = {p.device_mesh for p in chosen if isinstance(p, DTensor)}
    whole = [name for name, p in zip(names, chosen, strict=True) if not isinstance(p, DTensor)]
    if whole and meshes:
        raise GraftError(
            f"{whole[0]!r} is whole on every rank while other eligible parameters are sharded; "
            "shard all eligible parameters with FSDP (no ignored or replicated ones)."
        )
    if len(meshes) > 1:
        raise GraftError("The eligible parameters are sharded over different meshes; use one.")
    device = local(chosen[0]).device if chosen else torch.device("cpu")
    store = device if on_device else torch.device("cpu")

    def read(name: str, p: Tensor) -> Tensor:
        if callable(finetuned):
            return finetuned(name, shard_rows(p)) if isinstance(p, DTensor) else finetuned(name)
        return own_rows(finetuned[name], p)

    pre, ft, base, scores = [], [], [], []
    for name, p in zip(names, chosen, strict=True):
        mine = local(p).detach()
        rows = read(name, p).detach()
        if tuple(rows.shape) != tuple(mine.shape):
            raise GraftError(
                f"The fine-tuned rows of {name!r} are {tuple(rows.shape)}, not this rank's "
                f"{tuple(mine.shape)}; θ_pre and θ_ft must be the same architecture."
            )
        pre.append(mine.to(store, copy=True))
        ft.append(rows.to(store, dtype=p.dtype, copy=True))
        base.append(torch.zeros(mine.shape, dtype=torch.bool, device=store))
        scores.append(torch.zeros(mine.shape, dtype=score_dtype(p.dtype), device=store))
    mesh = next(iter(meshes)) if meshes else None
    return GraftTensors(list(names), chosen, pre, ft, base, scores, device, mesh)


def safetensors_rows(files: Sequence[str | Path]) -> Callable[[str, slice], Tensor]:
    """A θ_ft row reader over safetensors files (one checkpoint or its shards): each call reads
    only the requested rows of one tensor from disk."""
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}  # noqa: SIM118 (a safe_open handle)

    def read(name: str, rows: slice | None = None) -> Tensor:
        if name not in where:
            raise GraftError(
                f"The fine-tuned checkpoint has no tensor {name!r}; θ_pre and θ_ft must be the "
                "same architecture."
            )
        return where[name].get_tensor(name) if rows is None else where[name].get_slice(name)[rows]

    return read


def init_scores_sharded(tensors: GraftTensors, generator: torch.Generator) -> list[Tensor]:
    """S ~ U[0, 1) as :func:`adaptlab.graft.mask.init_scores` draws it for the whole tensors
    (in tensor order, from ``generator`` on the CPU), keeping this rank's rows: the same S as a
    one-process run. Each whole tensor exists transiently, one at a time."""
    out = []
    for p, s in zip(tensors.params, tensors.scores, strict=True):
        whole = torch.rand(p.shape, generator=generator, dtype=s.dtype)
        out.append(own_rows(whole, p).to(s.device))
    return out


def _group(tensors: GraftTensors) -> Any:
    return tensors.mesh.get_group()


def all_sum(value: float, tensors: GraftTensors) -> float:
    """``value`` summed over the ranks (itself in one process)."""
    if tensors.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=tensors.device)
    dist.all_reduce(t, group=_group(tensors))
    return float(t)


def _all_gather(t: Tensor, tensors: GraftTensors) -> Tensor:
    """``[*s] -> [world, *s]`` over the mesh's ranks."""
    if tensors.world == 1:
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(tensors.world)]
    dist.all_gather(out, t.contiguous(), group=_group(tensors))
    return torch.stack(out)


def _all_gather_object(obj: object, tensors: GraftTensors) -> list[Any]:
    if tensors.world == 1:
        return [obj]
    out: list[Any] = [None] * tensors.world
    dist.all_gather_object(out, obj, group=_group(tensors))
    return out


def top_delta_patch_sharded(tensors: GraftTensors, k: int) -> list[Tensor]:
    """This rank's part of b: exactly k ones at the largest |Δ| of the whole eligible set (ties:
    lower global position), as :func:`adaptlab.graft.patch.top_delta_patch` of the whole Δ.

    Communicates k values and T tie counts per rank, never Δ.

    Returns:
        ``[T]`` bool tensors shaped like the local shards.
    """
    n = tensors.n_eligible
    if not 0 <= k <= n:
        raise GraftError(f"A patch of {k} entries does not fit {n} eligible entries.")
    magnitudes = [tensors.delta(i).abs() for i in range(len(tensors))]
    if k == 0:
        return [torch.zeros_like(m, dtype=torch.bool) for m in magnitudes]
    dtype = magnitudes[0].dtype
    padded = torch.full((k,), -math.inf, dtype=dtype)
    mine = top_candidates(magnitudes, k).to(dtype)
    padded[: mine.numel()] = mine
    candidates = _all_gather(padded.to(tensors.device), tensors).reshape(-1)
    threshold = float(torch.topk(candidates, k).values[-1])
    above = all_sum(sum(int((m > threshold).sum()) for m in magnitudes), tensors)
    tied = torch.tensor([int((m == threshold).sum()) for m in magnitudes], dtype=torch.int64)
    tied_all = _all_gather(tied.to(tensors.device), tensors).cpu()  # [world, T]
    # global position order: tensor by tensor, each tensor's row blocks in rank order
    order = tied_all.T.reshape(-1).tolist()
    quota = torch.tensor(tie_quota(order, k - int(above))).reshape(len(tensors), tensors.world)
    return take_top(magnitudes, threshold, quota[:, tensors.rank].tolist())


def split_batches(
    batches: Sequence[Mapping[str, Tensor]], rank: int, world: int
) -> list[tuple[Mapping[str, Tensor], float]]:
    """This rank's share of a mask step's n batches, as ``(batch, weight)``.

    Rank r takes batches r, r + W, r + 2W, …; every rank must run the same number of backward
    passes (each is a collective under FSDP), so when W does not divide n the ranks left short
    add one backward of a batch weighted 0 (a zero gradient, one extra forward and backward).
    With FSDP2's gradient average over ranks, the local gradient is then (1/W) Σ_t ∂L_t/∂θ over
    all n batches.
    """
    mine = [(batch, 1.0) for batch in batches[rank::world]]
    per_rank = -(-len(batches) // world)
    return mine + [(batches[0], 0.0)] * (per_rank - len(mine))


@dataclass
class MaskParts:
    """A mask in the single-process layout of the artefact (on rank 0), built from shards.

    Attributes:
        index: name -> ``[n_i]`` int64 flat positions where γ_bin = 1.
        delta: name -> ``[n_i]`` float64 Δ at those positions.
        base: name -> ``[k_i]`` int64 flat positions of b.
        scores: name -> S, the whole tensor.
    """

    index: dict[str, Tensor]
    delta: dict[str, Tensor]
    base: dict[str, Tensor]
    scores: dict[str, Tensor]


def _positions(mask: Tensor, param: Tensor) -> Tensor:
    return mask.reshape(-1).nonzero().squeeze(1).cpu() + flat_offset(param)


def gather_scores(tensors: GraftTensors, scores: Sequence[Tensor], dst: int = 0) -> list[Tensor]:
    """The whole S of every tensor on rank ``dst`` (one tensor at a time; ``[]`` elsewhere)."""
    if tensors.world == 1:
        return [s.detach().cpu() for s in scores]
    group, world = _group(tensors), tensors.world
    out = []
    for p, s in zip(tensors.params, scores, strict=True):
        chunk = -(-p.shape[0] // world)
        block = torch.zeros((chunk, *p.shape[1:]), dtype=s.dtype, device=s.device)
        block[: s.shape[0]] = s
        blocks = [torch.empty_like(block) for _ in range(world)] if tensors.rank == dst else None
        dist.gather(block, blocks, dst=dist.get_global_rank(group, dst), group=group)
        if blocks is not None:
            out.append(torch.cat(blocks)[: p.shape[0]].cpu())
    return out


def gather_mask(
    tensors: GraftTensors,
    masks: Sequence[Tensor],
    scores: Sequence[Tensor] | None = None,
    with_scores: bool = True,
) -> MaskParts | None:
    """γ_bin, Δ at its positions, b and S in the artefact's single-process layout, on rank 0.

    Only the k-sized parts travel as positions; S (saved whole by the artefact) is gathered
    tensor by tensor. Every rank calls it.

    Args:
        tensors: the sharded (or whole) tensors.
        masks: ``[T]`` local bool γ_bin.
        scores: the S to save (default: ``tensors.scores``; e.g. the best step's copy).
        with_scores: gather S too (False: positions, Δ and the patch only).

    Returns:
        The parts on rank 0, None on the other ranks.
    """
    local_parts = []
    for i, p in enumerate(tensors.params):
        flat = masks[i].reshape(-1).nonzero().squeeze(1)
        delta = tensors.delta(i).reshape(-1)[flat.to(tensors.device)].double().cpu()
        local_parts.append((_positions(masks[i], p), delta, _positions(tensors.base[i], p)))
    gathered = _all_gather_object(local_parts, tensors)
    whole_scores = (
        gather_scores(tensors, scores if scores is not None else tensors.scores)
        if with_scores
        else []
    )
    if tensors.rank != 0:
        return None
    parts = MaskParts({}, {}, {}, {})
    for i, name in enumerate(tensors.names):
        parts.index[name] = torch.cat([g[i][0] for g in gathered])
        parts.delta[name] = torch.cat([g[i][1] for g in gathered])
        parts.base[name] = torch.cat([g[i][2] for g in gathered])
        if with_scores:
            parts.scores[name] = whole_scores[i]
    return parts


def save_parts(folder: str | Path, config: Mapping[str, Any], parts: MaskParts) -> None:
    """Write a gathered mask as :func:`adaptlab.graft.artefact.save_mask` writes a whole one
    (the same files, byte for byte). Call it on rank 0."""
    out: dict[str, Tensor] = {}
    for name in parts.index:
        for part in ("index", "delta", "base", "scores"):
            if name in getattr(parts, part):
                out[f"{part}/{name}"] = getattr(parts, part)[name]
    write_mask(folder, config, out)


def content_hash_sharded(tensors: GraftTensors, values: Sequence[Tensor]) -> str:
    """:func:`adaptlab.graft.artefact.content_hash` of the whole tensors whose local shards are
    ``values`` (e.g. ``tensors.pre``), on every rank; only the sampled entries travel."""
    samples = []
    for p, v in zip(tensors.params, values, strict=True):
        n = p.numel()
        picks = hash_positions(n)
        start = flat_offset(p)
        inside = picks[(picks >= start) & (picks < start + v.numel())] - start
        samples.append(v.detach().reshape(-1)[inside.to(v.device)].cpu())
    gathered = _all_gather_object(samples, tensors)
    digest = hashlib.sha256()
    for i, (name, p) in enumerate(zip(tensors.names, tensors.params, strict=True)):
        sample = torch.cat([g[i] for g in gathered]).contiguous()
        hash_update(digest, name, p.shape, sample)
    return digest.hexdigest()


def check_finite(tensors: GraftTensors) -> None:
    """Refuse a θ_ft with NaN or inf on E (Δ would not be finite), on every process alike."""
    bad = [i for i, ft in enumerate(tensors.ft) if not torch.isfinite(ft).all()]
    if all_sum(float(len(bad)), tensors):
        name = tensors.names[bad[0]] if bad else "an eligible parameter"
        raise GraftError(
            f"The fine-tuned parameter {name!r} holds NaN or inf, so Δ = θ_ft − θ_pre is not "
            "finite; graft a checkpoint from before the run diverged."
        )

"""θ_pre, θ_ft, the base patch b and the scores S of every eligible tensor, and θ(γ).

One :class:`GraftTensors` holds, for each eligible parameter (aligned lists, ``named_parameters``
order), the pretrained and fine-tuned values, the base patch and the mask scores, and writes
grafted weights into the model's own parameters:

    θ(γ) = θ_pre + γ ⊙ Δ,   Δ = θ_ft − θ_pre   (graft.md §4)

computed as ``torch.lerp(θ_pre, θ_ft, γ)``, which is exactly θ_pre at γ = 0 and exactly θ_ft at
γ = 1 (lerp evaluates ``end − (1 − γ)·Δ`` for γ ≥ 0.5), so the end points reproduce the two
models bit for bit. Binary masks use ``torch.where``.

Where they live: with ``on_device=True`` (``--deltas_on_device``) every tensor stays on the
model's device and an interpolation is one fused kernel per tensor. With ``on_device=False``
θ_pre, θ_ft, b and S stay in host memory and each interpolation copies them to the device tensor
by tensor, as the upstream code does (for models whose copies do not fit next to the model).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the parameters are ``DTensor`` shards along
dim 0; :func:`adaptlab.graft.sharded.collect_sharded` then fills θ_pre, θ_ft, b and S with this
rank's rows only (shaped like ``p.to_local()``), every method here reads and writes the local
shard, and ``mesh`` names the process group (None in one process).

Memory (E = eligible entries, model weights = M): θ_pre and θ_ft 2E, S 4 bytes per entry (E in
float32 models), b one byte per entry, plus the gradient E during a mask step: M + 4.25E in all
for a float32 model; sharded over W ranks, each holds 1/W of every E term.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from adaptlab.graft.errors import GraftError


@dataclass
class GraftTensors:
    """Per eligible tensor: the model parameter and θ_pre, θ_ft, b, S.

    Attributes:
        names: ``[T]`` eligible parameter names.
        params: ``[T]`` the model's parameters (their ``data`` receives θ(γ)).
        pre: ``[T]`` θ_pre, each shaped like its parameter.
        ft: ``[T]`` θ_ft.
        base: ``[T]`` bool base patch b.
        scores: ``[T]`` scores S (float32; float64 for a float64 model).
        device: where the model computes.
        mesh: the device mesh of sharded (FSDP2) parameters; None when they are whole.
    """

    names: list[str]
    params: list[nn.Parameter]
    pre: list[Tensor]
    ft: list[Tensor]
    base: list[Tensor]
    scores: list[Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def n_eligible(self) -> int:
        """N_E, the number of eligible entries (of the whole tensors when sharded)."""
        return sum(p.numel() for p in self.params)

    @property
    def world(self) -> int:
        """Processes the tensors are sharded over (1 when whole)."""
        return 1 if self.mesh is None else self.mesh.size()

    @property
    def rank(self) -> int:
        """This process's place among them (0 when whole)."""
        return 0 if self.mesh is None else self.mesh.get_local_rank()

    def items(self) -> Iterator[tuple[int, str]]:
        return enumerate(self.names)

    def delta(self, i: int) -> Tensor:
        """Δ_i = θ_ft − θ_pre of tensor ``i`` in float32 (float64 for float64 models), on the
        device."""
        dtype = torch.float64 if self.pre[i].dtype == torch.float64 else torch.float32
        return self._dev(self.ft[i]).to(dtype) - self._dev(self.pre[i]).to(dtype)

    def _dev(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True)

    @torch.no_grad()
    def set_fractional(self, gammas: Sequence[Tensor | float]) -> None:
        """θ ← θ_pre + γ ⊙ Δ on every eligible tensor (γ a tensor per parameter or a scalar)."""
        for i in range(len(self.params)):
            self.set_tensor(i, gammas[i])

    @torch.no_grad()
    def set_tensor(self, i: int, gamma: Tensor | float) -> None:
        """θ_i ← θ_pre,i + γ ⊙ Δ_i for one eligible tensor (``torch.lerp``: exact at 0 and 1)."""
        pre, ft = self._dev(self.pre[i]), self._dev(self.ft[i])
        if isinstance(gamma, Tensor):
            gamma = self._dev(gamma)
            work = torch.promote_types(pre.dtype, gamma.dtype)
            value = torch.lerp(pre.to(work), ft.to(work), gamma.to(work))
        else:
            value = torch.lerp(pre, ft, float(gamma))
        local(self.params[i]).copy_(value)

    @torch.no_grad()
    def set_binary(self, masks: Sequence[Tensor]) -> None:
        """θ ← θ_ft where the mask is set, θ_pre elsewhere (bit-exact)."""
        for i, p in enumerate(self.params):
            mask = self._dev(masks[i])
            local(p).copy_(torch.where(mask, self._dev(self.ft[i]), self._dev(self.pre[i])))

    @torch.no_grad()
    def reset(self) -> None:
        """θ ← θ_pre."""
        for i, p in enumerate(self.params):
            local(p).copy_(self._dev(self.pre[i]))


def local(t: Tensor) -> Tensor:
    """This rank's part of a parameter or gradient (a view sharing its storage): the local shard
    of a ``DTensor``, else the tensor's data."""
    return t.to_local() if isinstance(t, DTensor) else t.data


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 models (the exactness tests) keep float64 scores; every other model float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def collect(
    model: nn.Module,
    names: Sequence[str],
    finetuned: Mapping[str, Tensor],
    *,
    on_device: bool = True,
) -> GraftTensors:
    """θ_pre (the model's current weights) and θ_ft of the eligible tensors, b = 0, S = 0.

    Args:
        model: the pretrained model, already on its device; its eligible parameters will
            receive grafted values (and gradients during mask learning).
        names: eligible parameter names (:func:`adaptlab.graft.eligible.eligible_names`).
        finetuned: name -> θ_ft tensor (any device; copied once).
        on_device: keep the copies on the model's device (else in host memory, pinned on CUDA).

    A model sharded with FSDP2 (``DTensor`` parameters) is handed to
    :func:`adaptlab.graft.sharded.collect_sharded`, which keeps this rank's shards only.

    Raises:
        GraftError: a name is not a parameter of the model.
    """
    params = dict(model.named_parameters())
    if any(isinstance(params.get(name), DTensor) for name in names):
        from adaptlab.graft.sharded import collect_sharded

        return collect_sharded(model, names, finetuned, on_device=on_device)
    unknown = [name for name in names if name not in params]
    if unknown:
        raise GraftError(f"{unknown[0]!r} is not a parameter of the model; pass eligible names.")
    device = params[names[0]].device if names else torch.device("cpu")
    store = device if on_device else torch.device("cpu")
    pin = store.type == "cpu" and device.type == "cuda"

    def keep(t: Tensor, dtype: torch.dtype) -> Tensor:
        t = t.detach().to(store, dtype=dtype, copy=True)
        return t.pin_memory() if pin else t

    chosen = [params[name] for name in names]
    pre = [keep(p, p.dtype) for p in chosen]
    ft = [keep(finetuned[name], p.dtype) for name, p in zip(names, chosen, strict=True)]
    base = [torch.zeros(p.shape, dtype=torch.bool, device=store) for p in chosen]
    scores = [torch.zeros(p.shape, dtype=score_dtype(p.dtype), device=store) for p in chosen]
    return GraftTensors(list(names), chosen, pre, ft, base, scores, device)

"""Per-example gradients of f(x) ``[B, C]`` from C backward passes, kept as factors.

Examples of a batch do not interact, so the gradient of Σ_b f_b[c] with respect to a module's
output, taken at that module, is the per-example output gradient δ of every example at once.
One forward and C backward passes of the batch (instead of B·C, as a Jacobian of the batch
output takes) give, with the inputs a the forward saw:

| module             | per-example gradient of example b, output c                       |
|--------------------|-------------------------------------------------------------------|
| ``nn.Linear``        | weight Σ_t δ_bt a_btᵀ, bias Σ_t δ_bt                              |
| ``Conv1D`` (GPT-2)   | weight Σ_t a_bt δ_btᵀ, bias Σ_t δ_bt                              |
| ``nn.Embedding``     | row v: Σ over the b's tokens t with id v of δ_bt (not ``padding_idx``) |
| other modules        | ``vmap`` over examples of the module's own vjp (norm weights)     |
| anything else        | a loop of per-example backward passes over those parameters      |

The backward passes ask for gradients at module outputs only, so no weight gradient of the
batch is computed. A tensor used by several modules (a decoder tied to the word embedding)
gets the sum of its uses. :class:`PerExampleGradients` holds the factors (a, δ, token ids) and
materialises the gradient of any rows of a parameter on demand, ``[C, B, rows, row_numel]``,
so memory is set by the rows asked for, never by the whole ``[B, C, P]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from adaptlab.ntk.errors import KernelError
from adaptlab.ntk.function import KernelFunction

Rows = slice | Tensor  # a range of rows, or sorted row ids ``[R]``
UseKind = Literal["linear", "linear_t", "bias", "embedding", "dense"]


def row_shape(shape: torch.Size) -> tuple[int, int]:
    """A parameter seen as ``[rows, row_numel]``: dim 0 by the rest (1-D: one column)."""
    if len(shape) == 0:
        return 1, 1
    rows = shape[0]
    return rows, (shape.numel() // rows if rows else 0)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _is_plain(module: nn.Module, base: type) -> bool:
    """``module`` is ``base`` or a subclass with the same forward (the rule is exact)."""
    return isinstance(module, base) and type(module).forward is base.forward


@dataclass
class _Use:
    """One use of a parameter in the forward pass of one batch."""

    kind: UseKind
    inputs: Tensor | None = None  # [B, T, d_in]
    delta: Tensor | None = None  # [C, B, T, d_out]
    ids: Tensor | None = None  # [B, T]
    padding_idx: int | None = None
    grads: Tensor | None = None  # [C, B, rows, row_numel]


@dataclass
class _Call:
    """One hooked module call: what the backward passes must fill in."""

    module: nn.Module
    attrs: dict[str, str]  # attribute -> parameter name
    rule: str  # "linear", "conv1d", "embedding", "generic"
    output: Tensor
    versions: tuple[int, ...]
    inputs: tuple[Tensor, ...]
    values: dict[str, Tensor] = field(default_factory=dict)


class PerExampleGradients:
    """Per-example gradients of one batch as factors, materialised rows at a time.

    Attributes:
        batch_size: B.
        n_outputs: C.
        shapes: parameter name -> ``(rows, row_numel)``.
        uses: parameter name -> its uses in this batch (absent: zero gradient).
    """

    def __init__(self, batch_size: int, n_outputs: int, shapes: dict[str, tuple[int, int]]):
        self.batch_size = batch_size
        self.n_outputs = n_outputs
        self.shapes = shapes
        self.uses: dict[str, list[_Use]] = {}
        self._touched: dict[str, Tensor | None] = {}

    def add(self, name: str, use: _Use) -> None:
        self.uses.setdefault(name, []).append(use)

    @property
    def device(self) -> torch.device:
        use = next(iter(next(iter(self.uses.values()))))
        return next(t for t in (use.delta, use.grads) if t is not None).device

    def factor_numel(self) -> int:
        """Numbers held by the factors (tensors sharing storage counted once)."""
        seen: dict[int, int] = {}
        for uses in self.uses.values():
            for use in uses:
                for t in (use.inputs, use.delta, use.ids, use.grads):
                    if t is not None:
                        seen[t.untyped_storage().data_ptr()] = (
                            t.untyped_storage().nbytes() // t.element_size()
                        )
        return sum(seen.values())

    def touched(self, name: str) -> Tensor | None:
        """Sorted ids ``[R]`` of the rows that can have a nonzero gradient; ``None``: all."""
        if name not in self._touched:
            self._touched[name] = self._find_touched(name)
        return self._touched[name]

    def _find_touched(self, name: str) -> Tensor | None:
        n_rows = self.shapes[name][0]
        found = []
        for use in self.uses[name]:
            if use.kind in ("linear", "bias"):
                rows = (use.delta != 0).flatten(0, 2).any(dim=0).nonzero().flatten()
            elif use.kind == "embedding":
                ids = use.ids if use.padding_idx is None else use.ids[use.ids != use.padding_idx]
                rows = ids.unique()
            else:
                return None
            if len(rows) == n_rows:
                return None
            found.append(rows)
        return torch.cat(found).unique()

    def materialize(self, name: str, rows: Rows) -> Tensor:
        """Per-example gradients of rows ``rows`` of parameter ``name``.

        Returns:
            ``[C, B, R, row_numel]`` (class-major, so that flattening is free) in the
            model's dtype.
        """
        out = None
        for use in self.uses[name]:
            part = _materialize_use(use, rows, self.shapes[name][0])
            out = part if out is None else out + part
        return out

    def materialize_into(self, name: str, rows: Rows, target: Tensor) -> None:
        """Write :meth:`materialize` ``(name, rows)`` into ``target`` ``[C·B, R·row_numel]``.

        A single linear use whose product can land in ``target`` directly skips the copy.
        """
        uses = self.uses[name]
        use = uses[0]
        if (
            len(uses) == 1
            and use.kind == "linear"
            and target.is_contiguous()
            and target.dtype == use.delta.dtype
        ):
            delta = use.delta[..., rows]
            shape = (*delta.shape[:2], delta.shape[-1], use.inputs.shape[-1])
            torch.matmul(delta.transpose(-1, -2), use.inputs, out=target.view(shape))
            return
        target.copy_(self.materialize(name, rows).reshape(target.shape))

    def linear_factors(self, name: str) -> list[tuple[Tensor, Tensor]] | None:
        """``[(a [B, T, d_in], δ [C, B, T, d_out])]`` when every use is a linear weight."""
        uses = self.uses[name]
        if any(use.kind != "linear" for use in uses):
            return None
        return [(use.inputs, use.delta) for use in uses]


def _materialize_use(use: _Use, rows: Rows, n_rows: int) -> Tensor:
    if use.kind == "dense":
        return use.grads[:, :, rows]
    if use.kind == "linear":
        delta = use.delta[..., rows]  # [C, B, T, R]
        return torch.matmul(delta.transpose(-1, -2), use.inputs)
    if use.kind == "linear_t":
        inputs = use.inputs[..., rows]  # [B, T, R]
        return torch.matmul(inputs.transpose(-1, -2), use.delta)
    if use.kind == "bias":
        return use.delta[..., rows].sum(dim=2).unsqueeze(-1)
    return _embedding_rows(use, rows, n_rows)


def _embedding_rows(use: _Use, rows: Rows, n_rows: int) -> Tensor:
    """Scatter-add of the output gradients by token id, restricted to ``rows``."""
    n_out, batch, _, hidden = use.delta.shape
    ids = use.ids
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(n_rows)
        pos = ids - start
        valid = (pos >= 0) & (pos < stop - start)
        width = stop - start
    else:
        width = len(rows)
        pos = torch.searchsorted(rows.to(ids.device), ids.contiguous()).clamp(max=max(width - 1, 0))
        valid = rows.to(ids.device)[pos] == ids if width else torch.zeros_like(ids, dtype=bool)
    if use.padding_idx is not None:
        valid &= ids != use.padding_idx
    example = torch.arange(batch, device=ids.device)[:, None].expand_as(ids)
    target = (example * width + pos)[valid]
    out = use.delta.new_zeros(n_out, batch * width, hidden)
    out.index_add_(1, target, use.delta[:, valid])  # delta[:, valid]: [C, n_tokens, H]
    return out.view(n_out, batch, width, hidden)


class Capturer:
    """Hooks a :class:`KernelFunction` to collect per-example gradient factors of batches.

    Args:
        fn: the function.
        names: the parameters to differentiate (names of ``fn``'s parameter dict).
    """

    def __init__(self, fn: KernelFunction, names: list[str]) -> None:
        self.fn = fn
        self.names = list(names)
        wanted = set(self.names)
        conv1d = _conv1d_type()
        plan: list[tuple[nn.Module, dict[str, str], str]] = []
        claimed: set[str] = set()
        generic: list[tuple[nn.Module, dict[str, str]]] = []
        self.shapes: dict[str, tuple[int, int]] = {}
        for module, owned in fn.modules():
            attrs = {attr: name for attr, name in owned.items() if name in wanted}
            for attr, name in attrs.items():
                self.shapes[name] = row_shape(module._parameters[attr].shape)
            if not attrs:
                continue
            if _is_plain(module, nn.Linear):
                rule = "linear"
            elif conv1d is not None and _is_plain(module, conv1d):
                rule = "conv1d"
            elif (
                _is_plain(module, nn.Embedding)
                and module.max_norm is None
                and not module.scale_grad_by_freq
            ):
                rule = "embedding"
            else:
                generic.append((module, attrs))
                continue
            plan.append((module, attrs, rule))
            claimed.update(attrs.values())
        # A tensor a known layer uses is only registered (not used) by other modules, as
        # BERT's prediction-head bias is by the head that holds the decoder.
        for module, attrs in generic:
            attrs = {a: n for a, n in attrs.items() if n not in claimed}
            if attrs:
                plan.append((module, attrs, "generic"))
        missing = wanted - set(self.shapes)
        if missing:
            raise KernelError(
                f"Parameters {', '.join(sorted(missing))} are not in the model or its head; "
                "pass names from select_parameters."
            )
        self.plan = plan
        self._clone: set[int] = set()

    def __call__(
        self, params: Mapping[str, Tensor], batch: Mapping[str, Any]
    ) -> PerExampleGradients:
        """Factors of the per-example gradients of ``batch``.

        Args:
            params: parameter dict (at least :attr:`names`).
            batch: a batch for ``fn`` (moved to the parameters' device).

        Returns:
            The batch's :class:`PerExampleGradients`.
        """
        device = next(iter(params.values())).device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        for _ in range(3):
            out = self._capture(params, batch)
            if out is not None:
                return out
        raise KernelError(  # pragma: no cover - a module that rewrites its inputs every call
            "The model keeps modifying layer inputs or outputs in place; per-example gradients "
            "cannot follow it, use the loop of backward passes instead."
        )

    def _capture(
        self, params: Mapping[str, Tensor], batch: dict[str, Any]
    ) -> PerExampleGradients | None:
        batch_size = batch["input_ids"].shape[0]
        live = {name: params[name].detach().requires_grad_(True) for name in self.names}
        constants = {k: v for k, v in params.items() if k not in live}
        calls: list[_Call] = []
        fallback: set[str] = set()

        def hook(module, args, kwargs, output, attrs, rule):
            inputs = tuple(args) + tuple(kwargs.values())
            tensors = tuple(x for x in inputs if isinstance(x, Tensor))
            if rule == "embedding" and output.dim() > 0 and output.shape[0] == 1 < batch_size:
                # position ids shared by the batch: one copy per example
                output = output.expand(batch_size, *output.shape[1:])
                tensors = (tensors[0].expand(batch_size, *tensors[0].shape[1:]),)
            ok = (
                isinstance(output, Tensor)
                and output.requires_grad
                and output.shape[0] == batch_size
                and all(x.dim() > 0 and x.shape[0] == batch_size for x in tensors)
                and (rule == "generic" or len(tensors) == 1)
                and not (rule == "generic" and kwargs)
            )
            if not ok:
                fallback.update(attrs.values())
                return None
            cloned = id(module) in self._clone
            if cloned:
                tensors = tuple(x.clone() for x in tensors)
            call = _Call(
                module=module,
                attrs=attrs,
                rule=rule,
                output=output,
                versions=_versions(output, tensors),
                inputs=tuple(x.detach() for x in tensors),
                values={a: getattr(module, a).detach() for a in attrs} if rule == "generic" else {},
            )
            calls.append(call)
            if cloned:
                return output.clone()
            return output if rule == "embedding" else None

        handles = [
            module.register_forward_hook(
                lambda m, a, k, o, attrs=attrs, rule=rule: hook(m, a, k, o, attrs, rule),
                with_kwargs=True,
            )
            for module, attrs, rule in self.plan
        ]
        try:
            with torch.enable_grad():
                scores = self.fn({**constants, **live}, batch)
        finally:
            for handle in handles:
                handle.remove()
        stale = [c for c in calls if c.versions != _versions(c.output, c.inputs)]
        if stale:
            self._clone.update(id(c.module) for c in stale)
            return None
        n_out = scores.shape[1]
        grads = PerExampleGradients(batch_size, n_out, dict(self.shapes))
        recorded = {n for c in calls for n in c.attrs.values()} - fallback
        unrecorded = [n for n in self.names if n not in recorded and n not in fallback]
        if unrecorded:  # used outside a module call? then the loop takes them
            found = torch.autograd.grad(
                scores.sum(), [live[n] for n in unrecorded], retain_graph=True, allow_unused=True
            )
            fallback.update(n for n, g in zip(unrecorded, found, strict=True) if g is not None)
        calls = [c for c in calls if not fallback.intersection(c.attrs.values())]
        deltas: list[list[Tensor]] = [[] for _ in calls]
        with torch.enable_grad():
            for c in range(n_out):
                found = torch.autograd.grad(
                    scores[:, c].sum(),
                    [call.output for call in calls],
                    retain_graph=c < n_out - 1,
                    allow_unused=True,
                    materialize_grads=True,
                )
                for slot, g in zip(deltas, found, strict=True):
                    slot.append(g.detach())
        del scores
        for call, slot in zip(calls, deltas, strict=True):
            self._record(grads, call, torch.stack(slot))
        if fallback:
            for name, g in _loop_gradients(self.fn, params, batch, sorted(fallback)).items():
                grads.add(name, _Use("dense", grads=_class_major(g, self.shapes[name])))
        return grads

    def _record(self, grads: PerExampleGradients, call: _Call, delta: Tensor) -> None:
        batch_size = grads.batch_size
        if call.rule == "generic":
            found = _module_gradients(call.module, call.values, call.inputs, delta)
            for attr, name in call.attrs.items():
                grads.add(name, _Use("dense", grads=_class_major(found[attr], self.shapes[name])))
            return
        x = call.inputs[0]
        delta = delta.reshape(delta.shape[0], batch_size, -1, delta.shape[-1])
        for attr, name in call.attrs.items():
            if call.rule == "embedding":
                use = _Use("embedding", delta=delta, ids=x.reshape(batch_size, -1))
                use.padding_idx = call.module.padding_idx
            elif attr == "bias":
                use = _Use("bias", delta=delta)
            else:
                kind = "linear" if call.rule == "linear" else "linear_t"
                use = _Use(kind, inputs=x.reshape(batch_size, -1, x.shape[-1]), delta=delta)
            grads.add(name, use)


def _class_major(grads: Tensor, shape: tuple[int, int]) -> Tensor:
    """``[B, C, ...]`` per-example gradients as ``[C, B, rows, row_numel]``."""
    return grads.transpose(0, 1).reshape(grads.shape[1], grads.shape[0], *shape)


def _versions(output: Tensor, inputs: tuple[Tensor, ...]) -> tuple[int, ...]:
    """Version counters: a change means an in-place write after the module ran."""
    return (output._version, *(x._version for x in inputs))


def _module_gradients(
    module: nn.Module, values: dict[str, Tensor], inputs: tuple[Tensor, ...], delta: Tensor
) -> dict[str, Tensor]:
    """Per-example gradients of a module's own parameters: ``vmap`` of its vjp over examples.

    Returns:
        attribute -> ``[B, C, *shape]``.
    """

    def one(args: tuple[Tensor, ...], grad_out: Tensor) -> dict[str, Tensor]:
        def run(p: dict[str, Tensor]) -> Tensor:
            return functional_call(module, p, tuple(a.unsqueeze(0) for a in args))

        _, pull = vjp(run, values)
        return pull(grad_out.unsqueeze(0))[0]

    per_class = [vmap(one)(inputs, d) for d in delta]
    # detached: the module's other parameters may require grad
    return {attr: torch.stack([g[attr] for g in per_class], dim=1).detach() for attr in values}


def _loop_gradients(
    fn: KernelFunction, params: Mapping[str, Tensor], batch: Mapping[str, Any], names: list[str]
) -> dict[str, Tensor]:
    """Per-example gradients of ``names`` by one backward pass per example and output.

    Returns:
        name -> ``[B, C, numel]``.
    """
    batch_size = batch["input_ids"].shape[0]
    rows = []
    for b in range(batch_size):
        one = {
            k: v[b : b + 1] if isinstance(v, Tensor) and k != "label_word_ids" else v
            for k, v in batch.items()
        }
        live = {n: params[n].detach().requires_grad_(True) for n in names}
        with torch.enable_grad():
            scores = fn({**params, **live}, one)[0]
            per_out = [
                torch.autograd.grad(s, list(live.values()), retain_graph=True, allow_unused=True)
                for s in scores
            ]
        rows.append(
            [
                [
                    torch.zeros_like(live[n]) if g is None else g
                    for n, g in zip(names, gs, strict=True)
                ]
                for gs in per_out
            ]
        )
    return {
        n: torch.stack([torch.stack([g[k].flatten() for g in r]) for r in rows])
        for k, n in enumerate(names)
    }

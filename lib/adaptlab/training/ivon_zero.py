"""IVON inside a DeepSpeed ZeRO-2/3 engine: the posterior partitioned like the master weights.

Under ZeRO the optimiser never sees the model's parameters: DeepSpeed hands it one flat fp32
partition of each parameter group's master weights (this rank's share), sets the partition's
``.grad`` to the gradient averaged over the processes and micro-batches, calls ``step()`` and
then copies the new master weights into the (bf16 or fp32) weights the model computes with.
IVON is elementwise in everything but its noise, so :class:`ZeroIVON` keeps h and the
momentum of its partition only (``optimizer.state[partition]``) and:

- draws the posterior sample ε of a step for its partition alone, from the same per-parameter
  standard normals a single process would draw (seeded by ``(seed, step, draw)``, generated
  whole for each trainable parameter and sliced to this rank's share: cheap for adapters);
- writes θ = m + ε into the model's weights through the engine (ZeRO-2: its bit16 partition,
  then the all-gather DeepSpeed does after a step; ZeRO-3: its bit16 partition, which the
  forward gathers, and the persistent parameters re-gathered), keeping m in the fp32 partition;
- in ``step()`` records the engine's averaged gradient of the partition with the step's ε
  (Price: ε ⊙ ĝ) and updates m and h; DeepSpeed then writes m back into the model.

So a step over P processes equals one process over the whole batch with the same draw, and h,
the momentum and the resume state are split P ways like Adam's moments. For AdaLoRA trained
by IVON it also gathers what the rank allocator reads whole: h (ViLoRA's σ) and, with
``keep_gradients``, the step's averaged gradient (the sensitivity criterion). What differs from
data parallelism: the micro-batches of a step share the step's one draw (the gradient reaches
the optimiser only summed over them), so ``mc_samples`` must be 1; a Hessian summary, the saved
``ivon_hessian.safetensors`` and ``ivon_hessian_from`` gather or scatter h over the processes
(every process calls them). Offloading the optimiser or parameters is not supported::

    optimizer = ZeroIVON(params, lr=0.2, ess=len(train_set))     # the IVON arguments
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero_config)
    optimizer.attach(engine)
    with optimizer.sampled_params(train=True):   # one draw for the step's micro-batches
        for batch in micro_batches:
            engine.backward(loss_fn(engine, batch))
            engine.step()                        # the last one calls optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaptlab.training.errors import TrainingError
from adaptlab.training.ivon import IVON
from adaptlab.training.ivon_ops import posterior_noise, summary_stats


@dataclass(frozen=True)
class _Span:
    """Entries ``[start, start + length)`` of a flattened parameter, held by this rank at
    ``[offset, offset + length)`` of partition ``flat``."""

    flat: int
    offset: int
    start: int
    length: int


@dataclass
class _Layout:
    """Where each trainable parameter's entries live in this rank's partitions."""

    stage: int
    flats: list[torch.Tensor]  # the fp32 master partitions IVON steps, one per group
    groups: list[list[nn.Parameter]]  # the parameters of each IVON group, in the client's order
    spans: dict[nn.Parameter, list[_Span]] = field(default_factory=dict)
    publish: Callable[[list[torch.Tensor]], None] | None = None  # values -> model weights
    bit16: Callable[[int], torch.Tensor] | None = None  # the model's weights of partition i
    gather: Callable[[], None] = lambda: None  # ZeRO-3: gather the trainable weights released


def _full_shape(param: nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def _stage2_layout(zero: Any, groups: list[list[nn.Parameter]]) -> _Layout:
    """ZeRO-1/2: each group is one flat buffer (the parameters in order, padded at the end),
    cut into equal partitions; this rank steps ``single_partition_of_fp32_groups[i]``."""
    layout = _Layout(2, list(zero.single_partition_of_fp32_groups), groups)
    for i, params in enumerate(zero.round_robin_bit16_groups):
        rank = dist.get_rank(group=zero.real_dp_process_group[i])
        size = int(zero.partition_size[i])
        first, offset = rank * size, 0
        for param in params:
            begin, end = max(offset, first), min(offset + param.numel(), first + size)
            if begin < end:
                span = _Span(i, begin - first, begin - offset, end - begin)
                layout.spans.setdefault(param, []).append(span)
            offset += param.numel()

    def publish(values: list[torch.Tensor]) -> None:
        from deepspeed.runtime.utils import all_gather_dp_groups

        for i, value in enumerate(values):
            rank = dist.get_rank(group=zero.real_dp_process_group[i])
            zero.parallel_partitioned_bit16_groups[i][rank].data.copy_(value)
        all_gather_dp_groups(
            groups_flat=zero.bit16_groups_flat,
            partitioned_param_groups=zero.parallel_partitioned_bit16_groups,
            dp_process_group=zero.real_dp_process_group,
            start_alignment_factor=zero.nccl_start_alignment_factor,
            allgather_bucket_size=zero.allgather_bucket_size,
        )

    def bit16(i: int) -> torch.Tensor:
        return zero.parallel_partitioned_bit16_groups[i][
            dist.get_rank(zero.real_dp_process_group[i])
        ]

    layout.publish, layout.bit16 = publish, bit16
    return layout


def _stage3_layout(zero: Any, groups: list[list[nn.Parameter]]) -> _Layout:
    """ZeRO-3: every parameter is cut into equal chunks, chunk r on rank r; a sub-group's
    partition is its parameters' chunks one after the other."""
    targets = list(zero.sub_group_to_group_id.values())
    if sorted(targets) != list(range(len(groups))):
        raise TrainingError(
            "IVON under ZeRO-3 needs each parameter group in one sub-group; raise "
            "zero_optimization.sub_group_size above the number of trainable parameters."
        )
    order = sorted(range(len(targets)), key=targets.__getitem__)
    layout = _Layout(3, [zero.fp32_partitioned_groups_flat[s] for s in order], groups)
    rank = dist.get_rank(group=zero.dp_process_group)
    for flat, sub in enumerate(order):
        offset = 0
        for param, chunk in zip(
            zero.fp16_groups[sub], zero.fp16_partitioned_groups[sub], strict=True
        ):
            first = rank * chunk.numel()
            length = max(0, min(chunk.numel(), param.ds_numel - first))
            if length:
                layout.spans.setdefault(param, []).append(_Span(flat, offset, first, length))
            offset += chunk.numel()

    trainable = [param for params in groups for param in params]

    def publish(values: list[torch.Tensor]) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for sub, value in zip(order, values, strict=True):
            zero.fp16_partitioned_groups_flat[sub].data.copy_(value)
            zero._unflatten_partitioned_parameters(sub)
        # a gathered copy (persistent parameters stay gathered between steps) is stale: free
        # it and gather it anew (DeepSpeed's all-gather skips parameters already available)
        gathered = [p for p in trainable if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered, has_been_updated=False)
            gathered[0].all_gather(param_list=gathered)

    def bit16(i: int) -> torch.Tensor:
        """Partition ``i`` of the weights, with what was written into gathered copies
        (persistent parameters) since the last step copied in first."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for param in zero.fp16_groups[order[i]]:
            if param.ds_status != ZeroParamStatus.AVAILABLE:
                continue
            chunk = param.ds_tensor
            first = rank * chunk.numel()
            length = max(0, min(chunk.numel(), param.ds_numel - first))
            chunk.data[:length].copy_(param.data.flatten()[first : first + length])
        return zero.fp16_partitioned_groups_flat[order[i]]

    def gather() -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        released = [p for p in trainable if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if released:
            released[0].all_gather(param_list=released)

    layout.publish, layout.bit16, layout.gather = publish, bit16, gather
    return layout


class ZeroIVON(IVON):
    """:class:`~adaptlab.training.ivon.IVON` as a DeepSpeed ZeRO-2/3 engine's optimiser.

    Takes IVON's arguments (``sync`` is the engine's: always off here). Before
    :meth:`attach` it is a plain IVON.

    Raises:
        TrainingError: ``mc_samples`` other than 1.
    """

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["sync"] = False  # the engine averages the gradient; ε⊙ĝ is local to a partition
        super().__init__(params, *args, **kwargs)
        if self.mc_samples != 1:
            raise TrainingError(
                f"ivon_mc_samples={self.mc_samples} under DeepSpeed ZeRO: the engine hands IVON "
                "only the gradient summed over a step, so a step has one posterior draw; use "
                "ivon_mc_samples=1 or FSDP / data parallelism."
            )
        self._client_groups = [list(group["params"]) for group in self.param_groups]
        self._layout: _Layout | None = None
        self._pending: dict[int, torch.Tensor] = {}  # id(partition) -> the step's ε
        self.keep_gradients = False  # keep each step's averaged gradient (AdaLoRA sensitivity)
        self._gradients: dict[int, torch.Tensor] = {}  # id(partition) -> the last step's

    def attach(self, engine: nn.Module) -> None:
        """Read where the engine put each trainable entry; call it right after
        ``deepspeed.initialize``.

        Raises:
            TrainingError: the engine offloads the optimiser or parameters.
        """
        zero = engine.optimizer
        offloads = ("cpu_offload", "offload_optimizer", "offload_param")
        if any(getattr(zero, name, False) for name in offloads):
            raise TrainingError(
                "IVON under DeepSpeed does not support offload_optimizer / offload_param; "
                "drop the offload from the DeepSpeed config."
            )
        if engine.zero_optimization_partition_weights():
            self._layout = _stage3_layout(zero, self._client_groups)
        else:
            self._layout = _stage2_layout(zero, self._client_groups)

    @property
    def attached(self) -> bool:
        """Whether :meth:`attach` has read an engine's partitions."""
        return self._layout is not None

    def _zero_layout(self) -> _Layout:
        if self._layout is None:
            raise TrainingError("Call ZeroIVON.attach(engine) after deepspeed.initialize.")
        return self._layout

    def _flat_hess(self, index: int) -> torch.Tensor:
        layout = self._zero_layout()
        return self._param_state(layout.flats[index], self._flat_group(index))["hess"]

    def _flat_group(self, index: int) -> dict[str, Any]:
        """The hyper-parameters of partition ``index`` (the group dict survives DeepSpeed's
        swapping of the ``params`` lists)."""
        return self.param_groups[index] if len(self.param_groups) > index else self.param_groups[0]

    # -----------------------------------------------------------------------------------------
    # Posterior draws

    def _partition_normals(self, train: bool, draw: int | None) -> list[torch.Tensor]:
        """z ~ N(0, 1) of this rank's entries: the single-process draw of every trainable
        parameter (keys as :meth:`IVON._standard_normals`), sliced to the partitions; 0 on
        padding."""
        layout = self._zero_layout()
        if train:
            index, stream = 0, 0
        elif draw is not None:
            index, stream = draw, 2
        else:
            index, stream = self._prediction_draws, 1
            self._prediction_draws += 1
        zs = [torch.zeros_like(flat, dtype=torch.float32) for flat in layout.flats]
        for group_index, params in enumerate(layout.groups):
            device = layout.flats[0].device
            step = self._flat_group(group_index)["step"]
            generator = self._generator(device, (step, index, group_index, stream))
            for param in params:
                z = torch.randn(
                    _full_shape(param), generator=generator, device=device, dtype=torch.float32
                ).flatten()
                for span in layout.spans.get(param, []):
                    part = zs[span.flat][span.offset : span.offset + span.length]
                    part.copy_(z[span.start : span.start + span.length])
        return zs

    @contextlib.contextmanager
    def sampled_params(self, train: bool = False, draw: int | None = None) -> Iterator[None]:
        """The model's weights at a posterior draw m + ε while the body runs.

        With ``train`` the draw is the step's: the body runs the step's micro-batches through
        the engine, whose last ``engine.step()`` calls :meth:`step`, which consumes the draw
        (DeepSpeed then writes the new m into the model). Without, the weights return to m on
        exit (Monte Carlo prediction; ``draw`` as in IVON).
        """
        if self._layout is None:
            with super().sampled_params(train, draw):
                yield
            return
        layout = self._layout
        zs = self._partition_normals(train, draw)
        with torch.no_grad():
            hess = [self._flat_hess(i) for i in range(len(layout.flats))]
            group = self._flat_group(0)
            noise = posterior_noise(zs, hess, group["ess"], group["weight_decay"])
            layout.publish([flat + eps for flat, eps in zip(layout.flats, noise, strict=True)])
        if train:
            self._pending = {id(flat): eps for flat, eps in zip(layout.flats, noise, strict=True)}
        try:
            yield
        finally:
            left = bool(self._pending) if train else True
            self._pending = {}
            if left:  # prediction, or a training body that ended before its step
                with torch.no_grad():
                    layout.publish(list(layout.flats))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Record the engine's averaged gradient with the step's draw, then IVON's update of
        the partitions DeepSpeed passes in this call.

        Raises:
            TrainingError: a closure (the engine runs the forward), or no draw for the step.
        """
        if self._layout is None:
            return super().step(closure)
        if closure is not None:
            raise TrainingError("Under DeepSpeed the engine runs the forward; call step().")
        for group in self.param_groups:
            for flat in group["params"]:
                noise = self._pending.pop(id(flat), None)
                if noise is None:
                    raise TrainingError(
                        "IVON step() under DeepSpeed found no posterior draw; run the step's "
                        "micro-batches inside optimizer.sampled_params(train=True)."
                    )
                self._param_state(flat, group)
                self._record([flat], [noise], False)
                if self.keep_gradients:
                    self._gradients[id(flat)] = flat.grad.detach().float().clone()
        return super().step()

    @torch.no_grad()
    def _whole(self, parts: list[torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, values)`` of every trainable parameter, whole, from per-partition
        ``parts`` (each entry lives on exactly one process: one all-reduce of the sum)."""
        layout = self._zero_layout()
        params = [p for group in layout.groups for p in group]
        sizes = [_full_shape(p).numel() for p in params]
        whole = torch.zeros(sum(sizes), device=layout.flats[0].device)
        for param, part in zip(params, whole.split(sizes), strict=True):
            for span in layout.spans.get(param, []):
                values = parts[span.flat][span.offset : span.offset + span.length]
                part[span.start : span.start + span.length] = values
        dist.all_reduce(whole)
        return [
            (p, part.view(_full_shape(p)))
            for p, part in zip(params, whole.split(sizes), strict=True)
        ]

    def set_whole_gradients(self) -> None:
        """Give every trainable parameter its whole ``.grad``: the gradient the engine averaged
        for the last step (kept with ``keep_gradients``), gathered from the partitions, as
        AdaLoRA's sensitivity allocator reads it after the step. Every process calls it.

        Raises:
            TrainingError: ``keep_gradients`` is off or no step has run.
        """
        layout = self._zero_layout()
        if not self.keep_gradients or len(self._gradients) != len(layout.flats):
            raise TrainingError(
                "ZeroIVON keeps no gradient of the last step; set keep_gradients before it."
            )
        grads = [self._gradients[id(flat)] for flat in layout.flats]
        for param, grad in self._whole(grads):
            if param.data.shape == grad.shape:  # ZeRO-3: a gathered (persistent) parameter
                param.grad = grad.to(param.dtype)

    def gather_trainable(self) -> None:
        """ZeRO-3: gather every trainable weight DeepSpeed has released, so code outside the
        modules' forward (AdaLoRA's orthogonality penalty and rank masks) reads it whole. The
        adapter is then kept gathered as a persistent parameter (see
        :func:`adaptlab.training.zero.deepspeed_engine`). A no-op under ZeRO-1/2."""
        self._zero_layout().gather()

    @torch.no_grad()
    def pull_weight_changes(self) -> None:
        """Take into m what changed in the model's weights since the last step (AdaLoRA's rank
        masking writes zeros into ``lora_E``): entries where the weight the model computes with
        differs from m rounded to its dtype. Call it after the method's after-step hook."""
        layout = self._zero_layout()
        for i, flat in enumerate(layout.flats):
            weights = layout.bit16(i)
            stale = flat.to(weights.dtype) != weights
            flat[stale] = weights[stale].float()

    # -----------------------------------------------------------------------------------------
    # Whole-model views of h (collectives: every process calls them)

    def whole_hessians(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, h)`` of every trainable parameter, whole (fp32), on every process."""
        return self._whole([self._flat_hess(i) for i in range(len(self._zero_layout().flats))])

    def hess_stats(self) -> dict[str, float]:
        """IVON's summary of h over every trainable entry (padding left out)."""
        if self._layout is None:
            return super().hess_stats()
        return summary_stats(torch.cat([h.flatten() for _, h in self.whole_hessians()]))

    @torch.no_grad()
    def load_whole_hessians(self, values: Mapping[nn.Parameter, torch.Tensor]) -> None:
        """Set h of this rank's entries from whole per-parameter tensors (every parameter)."""
        layout = self._zero_layout()
        hess = [self._flat_hess(i) for i in range(len(layout.flats))]
        for param, value in values.items():
            flat_value = value.to(hess[0].device, torch.float32).flatten()
            for span in layout.spans.get(param, []):
                target = hess[span.flat][span.offset : span.offset + span.length]
                target.copy_(flat_value[span.start : span.start + span.length])

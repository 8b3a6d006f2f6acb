"""Process-group helpers shared by the scripts: rank/world, gathers, FSDP2 sharding and
loading from rank 0.

Scripts run the same code under ``python``, ``torchrun`` and ``accelerate launch``; the process
group is initialised by accelerate's :class:`~accelerate.PartialState` (NCCL on GPUs, gloo on
CPUs), so a two-process CPU run exercises the same collectives as a GPU cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import nn

from adaptlab.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world``, on ``device``."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info(cpu: bool = False) -> DistInfo:
    """Initialise (once) and describe the process group; ``cpu`` forces the CPU.

    On a machine without CUDA the CPU is asked for explicitly: accelerate only joins a
    multi-process launch into a (gloo) process group on CPUs when told so, and would otherwise
    start independent single-rank processes.
    """
    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    return DistInfo(state.process_index, state.num_processes, state.device)


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def all_gather_rows(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Stack equal-shaped tensors from every rank: ``[*s] -> [world, *s]``."""
    if info.world == 1:
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(info.world)]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


def all_gather_object(obj: object, info: DistInfo) -> list[object]:
    if info.world == 1:
        return [obj]
    out: list[object] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def main_then_share(check: Callable[[], T], info: DistInfo) -> T | None:
    """Run ``check`` on the main process only and end every process if it refuses the input.

    For checks of files every process would read alike (weight headers, cache hashes): under
    FSDP only rank 0 may open the checkpoint, and a refusal must reach the other ranks as the
    same sentence rather than leave them waiting at the next collective.

    Returns:
        ``check()``'s result on the main process, ``None`` elsewhere.

    Raises:
        UserError: ``check``'s own error on the main process, its message elsewhere.
    """
    result, error = None, None
    if info.is_main:
        try:
            result = check()
        except UserError as err:
            error = err
    message = next((m for m in all_gather_object(error and str(error), info) if m), None)
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result


def fsdp_requested() -> bool:
    """True when launched with an accelerate FSDP config (``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def shard_fsdp2(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    info: DistInfo,
    *,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    offload_policy: Any = None,
    ignored_params: set[nn.Parameter] | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard`` per block, then the root).

    Each rank keeps ``1/world`` of every parameter; a block's full weights exist only while it
    runs. Module objects are unchanged, so hooks attached by reference keep working. The same
    call serves CUDA (NCCL) and CPU (gloo) process groups.

    Args:
        model: the model, on the CPU or on ``info.device``.
        blocks: its transformer blocks (and any other module called on its own), one FSDP unit
            each.
        info: rank, world and device of this process.
        reshard_after_forward: free each block's gathered weights after its forward (training
            gathers them again in backward; ``False`` trades memory for one all-gather less).
        mp_policy: a ``MixedPrecisionPolicy`` (default: compute in the parameters' dtype).
        offload_policy: an ``OffloadPolicy`` (``CPUOffloadPolicy`` keeps shards in CPU memory).
        ignored_params: parameters left whole on every rank.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    given = {
        "mp_policy": mp_policy,
        "offload_policy": offload_policy,
        "ignored_params": ignored_params,
    }
    options = {"mesh": mesh, **{key: value for key, value in given.items() if value is not None}}
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    # Explicit for the root too: FSDP2 otherwise keeps the root's weights (embeddings, head)
    # gathered after forward, expecting a backward; inference wants them sharded again.
    fully_shard(model, reshard_after_forward=True, **options)
    return model


def load_from_rank0(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Fill a sharded model whose ranks but the first were built on the meta device.

    Rank 0 read the real weights (``state_dict``, its full state before sharding); every rank
    receives its shards of them by broadcast, then the buffers (rotary frequencies and other
    non-persistent ones, which no state dict carries). So only one process per job ever holds
    the whole model in host memory. Fine-tuning and extraction under FSDP both load this way.
    Every process calls it, after sharding and after moving its (meta) shards to their device
    with ``to_empty``; ``state_dict`` is ignored (pass ``{}``) on the other ranks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, dict(state_dict), options=options)
    with torch.no_grad():
        for _, buffer in model.named_buffers():
            dist.broadcast(buffer, src=0)


_REPLICATED = "_adaptlab_replicated"


def mark_replicated(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Record that ``params`` stay whole on every rank of a sharded ``model`` (FSDP ignored
    parameters that train), so :func:`average_replicated_gradients` keeps them in step."""
    object.__setattr__(model, _REPLICATED, tuple(params))


def replicated_parameters(model: nn.Module) -> tuple[nn.Parameter, ...]:
    """The trainable parameters :func:`mark_replicated` recorded on ``model`` (often none)."""
    return getattr(model, _REPLICATED, ())


def average_replicated_gradients(model: nn.Module) -> None:
    """Average the gradients of ``model``'s replicated trainable parameters over all ranks.

    FSDP reduce-scatters the gradients of the parameters it shards; those it was told to
    ignore get none, so without this every rank would step on its own micro-batches only.
    One all-reduce over the flattened gradients (a missing gradient counts as zeros, as on a
    rank whose batch did not reach the parameter). A no-op without replicated parameters or
    without a process group.
    """
    params = replicated_parameters(model)
    if not params or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        size = grad.numel()
        param.grad = flat[offset : offset + size].view_as(param).to(param.dtype)
        offset += size


def local_parameter_fraction(model: nn.Module) -> float:
    """Fraction of all parameter entries stored on this rank (1.0 unsharded, ~1/world FSDP)."""
    local = total = 0
    for param in model.parameters():
        total += param.numel()
        local += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    return local / max(total, 1)


# The last barrier's work, kept until the interpreter tears down (see shutdown).
_FINAL_WORK: list[Any] = []


def shutdown(info: DistInfo) -> None:
    """Leave the process group cleanly: a final barrier, then destroy the group.

    Gloo's worker thread may hold the last reference to a finished collective, which holds
    tensors Python has seen; if it drops that reference while the interpreter is finalizing,
    it cannot take the GIL and the process aborts ("terminate called without an active
    exception"). The final barrier waits on the collectives still in flight
    and holds them; keeping its work referenced here makes the main thread, not the worker,
    release them all.
    """
    if info.world > 1 and dist.is_initialized():
        work = dist.barrier(async_op=True)
        work.wait()
        _FINAL_WORK.append(work)
        dist.destroy_process_group()

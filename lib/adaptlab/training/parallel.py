"""How a fine-tuning run is spread over processes: data parallel, FSDP2 or DeepSpeed ZeRO.

| strategy | parameters          | gradients        | optimiser state | resume |
|----------|---------------------|------------------|-----------------|--------|
| ``ddp``  | replicated          | all-reduced      | replicated      | exact  |
| ``fsdp`` | sharded (FSDP2)     | reduce-scattered | sharded         | exact  |
| ``zero1``| replicated          | all-reduced      | partitioned     | exact  |
| ``zero2``| replicated          | partitioned      | partitioned     | exact  |
| ``zero3``| partitioned         | partitioned      | partitioned     | exact  |

IVON and AdaLoRA (:data:`REPLICATED_TRAINABLE`) run under ``ddp``, and under ``fsdp`` with whole
trainable weights on every rank (only the frozen base sharded). Under ZeRO, ``ivon`` runs with
its posterior partitioned like the master weights (:mod:`adaptlab.training.ivon_zero`), and
AdaLoRA only when trained by ``ivon`` (any criterion; ZeRO-3 keeps its adapter gathered).

Resume states are this package's safetensors per rank, not DeepSpeed's pickles, resumed with
the same number of processes (``adaptlab.training.sharded_state``).

``fsdp`` is asked for with ``fsdp=true`` or an accelerate FSDP config (``ACCELERATE_USE_FSDP``);
``zero{1,2,3}`` with ``deepspeed=CONFIG.json`` or an accelerate DeepSpeed config that names one.
With one process every strategy falls back to ``ddp`` (nothing to shard across).

Both sharded strategies are set up here rather than by ``accelerator.prepare``: accelerate
builds its FSDP state only on GPUs and runs DeepSpeed only on GPUs, so a CPU launch would
silently train unsharded. Doing it ourselves makes a two-process CPU (gloo) run execute the
same code as a GPU cluster::

    strategy = requested_strategy(cfg.fsdp, cfg.deepspeed)   # before the Accelerator exists
    ...
    model = shard_fsdp(model, info, mixed_precision="bf16")  # FSDP2: per block, then the root
    engine = deepspeed_engine(model, optimizer, fill_deepspeed_config(...))  # ZeRO

FSDP2 (``fully_shard``) keeps the module objects, so PEFT, the hooks and the optimiser see the
same modules; parameters become ``DTensor`` shards. The DeepSpeed engine is driven directly
(:mod:`adaptlab.training.zero`: ``engine.backward`` and ``engine.step`` per micro-batch).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptlab.distributed import (
    DistInfo,
    fsdp_requested,
    mark_replicated,
    shard_fsdp2,
)
from adaptlab.extract.points import decoder_layers, unwrap
from adaptlab.training.methods import METHODS
from adaptlab.training.objectives import find_linear_head
from adaptlab.training.optim import (
    WHOLE_TRAINABLE_OPTIMIZERS,
    TrainingError,
)

# Optimisers and methods that need whole trainable weights and gradients on every rank, as
# their registries declare them (IVON, AdaLoRA). FSDP then shards only the frozen weights; ZeRO
# cannot run them.
REPLICATED_TRAINABLE = WHOLE_TRAINABLE_OPTIMIZERS | {
    name for name, method in METHODS.items() if method.whole_trainable
}


@dataclass(frozen=True)
class Strategy:
    """How the run is spread over its processes.

    Attributes:
        name: ``ddp``, ``fsdp`` or ``zero{stage}``.
        deepspeed_config: the DeepSpeed JSON as written (``"auto"`` entries unfilled).
    """

    name: str
    deepspeed_config: Mapping[str, Any] | None = None

    @property
    def zero_stage(self) -> int | None:
        return int(self.name[4:]) if self.name.startswith("zero") else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def requested_strategy(fsdp: bool | None, deepspeed: str | None) -> Strategy:
    """The strategy asked for by the config or the launcher, before any process group exists.

    Args:
        fsdp: ``FinetuneConfig.fsdp`` (None: from ``ACCELERATE_USE_FSDP``).
        deepspeed: ``FinetuneConfig.deepspeed`` (None: the JSON an accelerate DeepSpeed config
            names in ``deepspeed_config_file``).

    Raises:
        TrainingError: both FSDP and DeepSpeed asked for, an accelerate DeepSpeed config without
            a JSON file, or an unreadable or unsupported DeepSpeed JSON.
    """
    from_accelerate = _env_flag("ACCELERATE_USE_DEEPSPEED")
    path = deepspeed or (
        os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if from_accelerate else None
    )
    if from_accelerate and not path:
        raise TrainingError(
            "The accelerate DeepSpeed config names no deepspeed_config_file; point it to a JSON "
            "such as accelerate_configs/deepspeed_zero3.json or pass --deepspeed."
        )
    use_fsdp = fsdp_requested() if fsdp is None else fsdp
    if path and use_fsdp:
        raise TrainingError(
            "Both FSDP and DeepSpeed are asked for (fsdp, deepspeed or the accelerate config); "
            "pick one."
        )
    if path:
        config = read_deepspeed_config(path)
        return Strategy(f"zero{config['zero_optimization']['stage']}", config)
    return Strategy("fsdp" if use_fsdp else "ddp")


def read_deepspeed_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a DeepSpeed JSON config for this script.

    Raises:
        TrainingError: a missing or invalid file, a ZeRO stage other than 1-3, an ``optimizer``
            or ``scheduler`` section (the run config builds both) or fp16 turned on.
    """
    file = Path(path)
    if not file.is_file():
        raise TrainingError(
            f"The DeepSpeed config {file} does not exist; pass a JSON file such as "
            "accelerate_configs/deepspeed_zero3.json."
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise TrainingError(f"The DeepSpeed config {file} is not valid JSON ({err}).") from None
    stage = config.get("zero_optimization", {}).get("stage")
    checks = [
        (
            stage in (1, 2, 3),
            f"{file} sets zero_optimization.stage={stage}; use 1, 2 or 3 (or plain data "
            "parallelism without --deepspeed).",
        ),
        (
            not {"optimizer", "scheduler"} & set(config),
            f"{file} has an optimizer or scheduler section, but the run config builds both; "
            "remove them.",
        ),
        (
            config.get("fp16", {}).get("enabled", False) in (False, "auto"),
            f"{file} turns fp16 on, which this script does not offer; use bf16.",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)
    return config


def resolve_strategy(requested: Strategy, world: int) -> Strategy:
    """``requested``, or ``ddp`` when there is a single process (nothing to shard across)."""
    return requested if world > 1 else Strategy("ddp")


def check_strategy(
    strategy: Strategy,
    optimizer: str,
    method: str,
    from_linearhead: bool,
    l1_to_init: float = 0.0,
    ivon_mc_samples: int = 1,
) -> None:
    """Refuse, before loading, what ``strategy`` cannot run.

    Raises:
        TrainingError: IVON with ``method=full`` under FSDP or ZeRO (every base weight would
            be trainable, and IVON needs the weights it updates whole or, under ZeRO, draws
            their noise whole on every process), ivon-opt or AdaLoRA
            under ZeRO (they need whole trainable weights and gradients on every rank; but
            AdaLoRA trained by adaptlab's IVON runs under ZeRO), IVON
            with ``ivon_mc_samples`` other than 1 under ZeRO (one draw per step there),
            ``from_linearhead`` under ZeRO-3 (the head is fitted on features of the whole
            model, which ZeRO-3 partitions while loading), or
            ``l1_to_init`` under ZeRO (its gradient goes into the gradients between backward
            and clipping, which the engine keeps in its own partitioned buffers).
    """
    if optimizer == "ivon" and method == "full" and strategy.zero_stage is not None:
        raise TrainingError(
            f"optimizer=ivon with method=full under {strategy.name} would draw the posterior "
            "noise of every base weight whole on every process at every step; train LoRA "
            "adapters (IVON then steps the engine's partitions of the adapter), or use data "
            "parallelism."
        )
    if optimizer in WHOLE_TRAINABLE_OPTIMIZERS and method == "full" and strategy.name != "ddp":
        raise TrainingError(
            f"optimizer={optimizer} with method=full under {strategy.name} would need every "
            "base weight whole on every rank (IVON samples the weights it updates and keeps "
            "their posterior whole), so nothing could be sharded; train LoRA or AdaLoRA "
            "adapters, whose parameters stay replicated while the frozen base is sharded, or "
            "drop the sharding."
        )
    if strategy.zero_stage is not None and optimizer == "ivon" and ivon_mc_samples != 1:
        raise TrainingError(
            f"ivon_mc_samples={ivon_mc_samples} under {strategy.name}: the engine hands IVON "
            "only the gradient summed over a step, so a step has one posterior draw; use "
            "ivon_mc_samples=1, or FSDP (fsdp=true) or data parallelism."
        )
    # ZeroIVON steps the engine's partitions and gives AdaLoRA trained by it what it reads whole
    # (σ, the averaged gradient; ZeRO-3 keeps the adapter gathered)
    ivon_adalora = method == "adalora" and optimizer == "ivon"
    for name in (optimizer, method):
        allowed = {"ivon", "adalora"} if ivon_adalora else {"ivon"}
        if name in REPLICATED_TRAINABLE - allowed and strategy.zero_stage is not None:
            raise TrainingError(
                f"{name} needs whole, replicated trainable weights and gradients, which "
                f"{strategy.name} partitions; use FSDP (fsdp=true: it then shards only the "
                "frozen weights) or data parallelism."
            )
    if from_linearhead and strategy.zero_stage == 3:
        raise TrainingError(
            "from_linearhead fits the head on features of the whole model, which ZeRO-3 "
            "partitions while loading; use ZeRO-2, FSDP or data parallelism for it."
        )
    if l1_to_init > 0 and strategy.zero_stage is not None:
        raise TrainingError(
            "l1_to_init adds its gradient between backward and clipping, which DeepSpeed "
            f"({strategy.name}) does inside its engine; use FSDP (fsdp=true) or data "
            "parallelism for it."
        )


# ---------------------------------------------------------------------------------------------
# FSDP2


def shard_fsdp(
    model: nn.Module,
    info: DistInfo,
    *,
    mixed_precision: str = "no",
    activation_checkpointing: bool = False,
    replicate_trainable: bool = False,
) -> nn.Module:
    """Shard a (PEFT-wrapped) causal LM with FSDP2: each decoder block (and an attached linear
    head), then the root.

    Call it after the method has wrapped and frozen the model and before the optimiser is
    built, so the optimiser holds the sharded parameters. Frozen and trainable parameters of a
    block share one FSDP unit (FSDP2 accepts mixed ``requires_grad``).

    With ``replicate_trainable`` only the frozen weights are sharded: the trainable ones (an
    adapter) stay whole on every rank, FSDP ignores them, and their gradients are averaged by
    :func:`~adaptlab.distributed.average_replicated_gradients` (IVON all-reduces its own
    samples instead), as IVON and AdaLoRA (rank allocation from whole gradients) need; the
    optimiser state is then replicated too, which for an adapter is small.

    Settings an accelerate FSDP config exports are honoured: ``fsdp_activation_checkpointing``
    (``FSDP_ACTIVATION_CHECKPOINTING``), ``fsdp_reshard_after_forward``
    (``FSDP_RESHARD_AFTER_FORWARD``) and ``fsdp_offload_params`` (``FSDP_OFFLOAD_PARAMS``).

    Args:
        model: the prepared model, on the CPU or on this process's device.
        info: rank, world and device of this process.
        mixed_precision: ``bf16`` computes in bfloat16 and reduces gradients in float32.
        activation_checkpointing: recompute each block's activations in backward (also on
            when the accelerate config asks for it).
        replicate_trainable: keep the trainable parameters whole on every rank.

    Returns:
        The same model object, sharded, on ``info.device``.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    if activation_checkpointing or _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        # Non-reentrant: works with frozen inputs (PEFT) and with FSDP2's hooks.
        unwrap(model).gradient_checkpointing_enable({"use_reentrant": False})
    mp_policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    offload = CPUOffloadPolicy() if _env_flag("FSDP_OFFLOAD_PARAMS") else OffloadPolicy()
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true")
    # 4-bit weights packed in uint8 lose their quantisation state when FSDP turns them into
    # DTensors: they stay whole on every rank (packed in a float dtype, they shard).
    packed = {
        p
        for p in model.parameters()
        if type(p).__name__ == "Params4bit" and not p.is_floating_point()
    }
    keep_4bit_packing(model)
    replicated = [p for p in model.parameters() if p.requires_grad] if replicate_trainable else []
    units = list(decoder_layers(model))
    head = find_linear_head(model)
    if head is not None and not replicate_trainable:
        units.append(head)  # its own unit: the objective calls it after the root's forward
    shard_fsdp2(
        model,
        units,
        info,
        reshard_after_forward=reshard,
        mp_policy=mp_policy,
        offload_policy=offload,
        ignored_params=packed | set(replicated),
    )
    target = torch.device("cpu") if isinstance(offload, CPUOffloadPolicy) else info.device
    if any(p.is_meta for p in model.parameters()):  # filled by load_from_rank0 next
        model = model.to_empty(device=target)  # new parameter objects
    elif not isinstance(offload, CPUOffloadPolicy):
        model = model.to(info.device)
    if replicate_trainable:  # looked up after the move: to_empty makes new parameter objects
        mark_replicated(model, [p for p in model.parameters() if p.requires_grad])
    return model


def trainable_as_on_rank0(model: nn.Module) -> None:
    """Give every rank the ``requires_grad`` flags of rank 0's model.

    A model built on the meta device can come out of an adapter library with different flags
    (PEFT's AdaLoRA leaves its fixed ``ranknum`` trainable when moved to meta), and FSDP units
    built from different flags do not match across ranks. Every process calls it.
    """
    import torch.distributed as dist

    names = [[name for name, p in model.named_parameters() if p.requires_grad]]
    dist.broadcast_object_list(names, src=0)
    trainable = set(names[0])
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def keep_4bit_packing(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (a no-op on GPUs).

    On first use in eval mode it repacks a weight and its quantisation state in place; FSDP and
    ZeRO-3 gather a fresh copy of the weight at every forward, which the repacked state would
    no longer match.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_deepspeed(model: nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


# ---------------------------------------------------------------------------------------------
# Whole state dicts and what each rank holds


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def full_state_dict(accelerator: Any, model: nn.Module, trainable_only: bool) -> dict:
    """The unsharded state dict of ``model`` on the main process (``{}`` elsewhere).

    Every process must call it (gathering shards is a collective). ``trainable_only`` gathers
    just the trainable parameters (an adapter), never the frozen base weights.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        model: plain, DDP-, FSDP2-sharded or a DeepSpeed engine.
        trainable_only: a sharded model gathers only the parameters that train (all an adapter
            needs); a replicated one has nothing to gather and returns everything.

    Returns:
        ``{name: tensor}`` with the names of the unwrapped model, on the CPU for sharded models.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
        )
        return get_model_state_dict(model, options=options)
    if is_deepspeed(model):
        return _deepspeed_state_dict(accelerator, model, trainable_only)
    return accelerator.get_state_dict(model)


def _deepspeed_state_dict(accelerator: Any, engine: nn.Module, trainable_only: bool) -> dict:
    module = engine.module
    if engine.zero_optimization_partition_weights():  # ZeRO-3
        if not trainable_only:
            return engine._zero3_consolidated_16bit_state_dict() or {}
        import deepspeed

        params = _trainable(module)
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            state_dict = {n: p.detach().cpu().clone() for n, p in params}
        return state_dict if accelerator.is_main_process else {}
    if not accelerator.is_main_process:
        return {}
    if trainable_only:
        return {n: p.detach().cpu().clone() for n, p in _trainable(module)}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@contextlib.contextmanager
def hidden_from_accelerate(strategy: Strategy) -> Iterator[None]:
    """Hide an accelerate DeepSpeed launch while the Accelerator is built.

    With ``ACCELERATE_USE_DEEPSPEED`` set, accelerate on a GPU expects to build and drive the
    engine itself; this script drives it (:func:`zero_train_step`), so the Accelerator must see
    a plain multi-process launch.
    """
    saved = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    if strategy.zero_stage is not None and saved is not None:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = saved

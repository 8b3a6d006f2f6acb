"""DeepSpeed ZeRO for fine-tuning: the config filled from the run, the engine over the existing
process group, ZeRO-3 loading and one optimiser step through the engine.

The engine is driven directly (:func:`zero_train_step`: ``engine.backward`` and ``engine.step``
per micro-batch) rather than by ``accelerator.prepare``, which runs DeepSpeed only on GPUs; so a
two-process CPU (gloo) run executes the same code as a GPU cluster. With IVON the optimiser is
:class:`~adaptlab.training.ivon_zero.ZeroIVON` (its posterior partitioned like the master
weights).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adaptlab.training.ivon_zero import ZeroIVON
from adaptlab.training.loop import StepResult
from adaptlab.training.methods import Method
from adaptlab.training.objectives import Objective
from adaptlab.training.optim import TrainingError, unwrap_optimizer
from adaptlab.training.parallel import keep_4bit_packing


def fill_deepspeed_config(
    config: Mapping[str, Any],
    *,
    micro_batch_size: int,
    accumulation: int,
    world: int,
    max_grad_norm: float | None,
    bf16: bool,
    hidden_size: int,
) -> dict[str, Any]:
    """A copy of ``config`` with its ``"auto"`` entries set from the run.

    Batch sizes come from the batch plan, ``gradient_clipping`` from ``max_grad_norm`` (0: none),
    ``bf16.enabled`` from ``mixed_precision``; ZeRO bucket sizes follow the hidden size as in
    the transformers integration. ZeRO-3 always gathers weights for saving.

    Raises:
        TrainingError: a set value that disagrees with the run, or an ``"auto"`` left that
            nothing fills.
    """
    filled = json.loads(json.dumps(config))
    run = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world,
        "gradient_clipping": float(max_grad_norm or 0.0),
    }
    for key, value in run.items():
        given = filled.get(key, "auto")
        if given != "auto" and given != value:
            raise TrainingError(
                f"The DeepSpeed config sets {key}={given} but the run needs {value}; set it to "
                '"auto".'
            )
        filled[key] = value
    filled.setdefault("bf16", {})
    if filled["bf16"].get("enabled", "auto") == "auto":
        filled["bf16"]["enabled"] = bf16
    filled["fp16"] = {"enabled": False}
    filled.setdefault("zero_allow_untested_optimizer", True)  # SGD / SignGD are plain torch
    zero = filled["zero_optimization"]
    sizes = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    left = [key for key, value in _flat_items(filled) if value == "auto"]
    if left:
        raise TrainingError(
            f'The DeepSpeed config leaves {left[0]}="auto", which this script does not fill; '
            "give a value."
        )
    return filled


def _flat_items(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            items += _flat_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _join_deepspeed() -> None:
    """Point DeepSpeed's communicator at the process group accelerate created."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def deepspeed_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Mapping[str, Any],
    gathered_trainable: bool = False,
) -> nn.Module:
    """Wrap ``model`` and ``optimizer`` in a DeepSpeed engine over the existing process group.

    The optimiser stays the caller's (its ``param_groups`` keep the learning rate the
    scheduler sets); ZeRO partitions its state and, with stage 3, the parameters.

    Args:
        model: the (PEFT-wrapped) model.
        optimizer: its optimiser.
        config: the filled DeepSpeed config.
        gathered_trainable: under ZeRO-3, keep every trainable parameter gathered on every
            process between steps (DeepSpeed's persistent parameters: the persistence
            threshold is raised to the largest trainable tensor), as ViLoRA needs for its
            orthogonality penalty and rank masks; the frozen base stays partitioned but for
            the tensors under that threshold (norms, biases).
    """
    import deepspeed

    config = json.loads(json.dumps(config))
    if gathered_trainable and config["zero_optimization"]["stage"] == 3:
        zero = config["zero_optimization"]
        largest = max(p.numel() for p in model.parameters() if p.requires_grad)
        zero["stage3_param_persistence_threshold"] = max(
            int(zero.get("stage3_param_persistence_threshold", 0)), largest
        )
    keep_4bit_packing(model)
    _join_deepspeed()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    return engine


@contextlib.contextmanager
def zero3_loading(config: Mapping[str, Any] | None) -> Iterator[None]:
    """While open, ``from_pretrained`` loads every weight straight into its ZeRO-3 partition.

    No process ever holds the whole model (transformers' ``HfDeepSpeedConfig``, which it and
    PEFT read through a weak reference; PEFT then gathers the weights an adapter's
    initialisation reads). A no-op without a ZeRO-3 ``config``.
    """
    if config is None or config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    _join_deepspeed()  # zero.Init reads the world size from DeepSpeed's own communicator
    keep = HfDeepSpeedConfig(dict(config))
    try:
        yield
    finally:
        del keep


def zero_train_step(
    engine: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    micro_batches: Sequence[Mapping[str, Any]],
    objective: Objective,
    accelerator: Any,
    method: Method,
    step: int,
    max_grad_norm: float | None = None,
) -> StepResult:
    """One optimiser step through a DeepSpeed engine (same arguments as ``loop.train_step``).

    ``engine.backward`` divides each micro-batch loss by the engine's accumulation steps and
    ``engine.step`` after every micro-batch reduces, clips and steps at the last one, so the
    update is the one ``train_step`` makes; the engine clips to its ``gradient_clipping``.
    With IVON (:class:`~adaptlab.training.ivon_zero.ZeroIVON`) the micro-batches run at the
    step's one posterior draw.

    Raises:
        TrainingError: the engine accumulates over another number of micro-batches.
    """
    if engine.gradient_accumulation_steps() != len(micro_batches):
        raise TrainingError(
            f"The DeepSpeed engine accumulates {engine.gradient_accumulation_steps()} "
            f"micro-batches but the step has {len(micro_batches)}; report this bug."
        )
    engine.train()
    lr = float(optimizer.param_groups[0]["lr"])
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = 0
    inner = unwrap_optimizer(optimizer)
    zero_ivon = isinstance(inner, ZeroIVON)
    draw = inner.sampled_params(train=True) if zero_ivon else contextlib.nullcontext()
    with draw:  # IVON: the step's one posterior draw, consumed by the last engine.step()
        for batch in micro_batches:
            out = objective(engine, batch)
            if zero_ivon:  # ZeRO-3: the penalty reads the adapter outside the forward
                inner.gather_trainable()
            extra = method.regularizer(engine)
            engine.backward(out.loss if extra is None else out.loss + extra)
            engine.step()
            loss_sum += out.loss.detach().float() / len(micro_batches)
            tokens += int(batch["attention_mask"].sum())
    scheduler.step()
    if zero_ivon:  # ZeRO-3: the rank masks write into the adapter
        inner.gather_trainable()
        if inner.keep_gradients:  # AdaLoRA's sensitivity reads whole gradients
            inner.set_whole_gradients()
    method.after_step(engine, step, optimizer)
    if zero_ivon and inner.keep_gradients:
        for param in engine.module.parameters():
            param.grad = None
    if zero_ivon:  # AdaLoRA masked ranks in the model's weights: into IVON's m too
        inner.pull_weight_changes()
    grad_norm = None if max_grad_norm is None else float(engine.get_global_grad_norm())
    loss_mean = accelerator.reduce(loss_sum, reduction="mean")
    token_total = accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum")
    return StepResult(float(loss_mean), int(token_total), lr, grad_norm)

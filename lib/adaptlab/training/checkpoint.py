"""Checkpoints and exact resume of fine-tuning runs.

A run folder holds::

    run.json                   fingerprint and config of the run (written first)
    checkpoints/step_{s}/      weights at the log-spaced steps (and step_0, epoch_{e})
    best/                      weights at the best evaluation so far
    final/                     weights at the end
    resume/                    trainer state for an exact resume (removed when the run ends)
    metrics.jsonl, result.json

Weights are in the Hugging Face on-disk format: an adapter folder (``adapter_config.json``,
``adapter_model.safetensors``) for adapter methods, a ``save_pretrained`` model folder with its
tokenizer otherwise. PEFT methods (LoRA...) write PEFT's folder; adaptlab's own adapters
(bottleneck and attention adapters) the same layout with ``peft_type`` ``ADAPTLAB``
(:mod:`adaptlab.adapters.folder`); both load as models on their recorded base. Each folder carries
``adaptlab_checkpoint.json`` (step, epoch, run fingerprint). A run with a linear
classification head (``head=linear``) also writes it as ``linear_head.safetensors``
(``linear.weight`` [C, H], ``linear.bias`` [C]; :func:`load_linear_head`), outside the HF
files, so the folder still loads as a plain model or adapter.

``resume/`` holds the trainable parameters, the optimiser and scheduler states (with IVON's
step counter, which its ``state_dict`` omits), every
process's RNG states (python, numpy, torch, CUDA), method state (AdaLoRA's allocator) and
``trainer_state.json`` (step, data position, evaluations so far). Restored onto a model
prepared exactly as in a fresh run, the remaining steps are the same computation as in an
uninterrupted run. Under FSDP every process writes its own slices of the trainable parameters
and of the optimiser state (``shard_rank{r}.safetensors``, no pickle;
:mod:`adaptlab.training.sharded_state`); the run resumes with the same number of processes.

Every folder is written under a temporary name and renamed into place (the previous version
is moved aside first and deleted after), so a kill never leaves a half-written checkpoint
under a real name.

Log-spaced steps (landscape.md §4), e.g. for the paper's T = 1140::

    >>> log_spaced_steps(1140, 10)
    [1, 2, 4, 8, 17, 34, 68, 138, 279, 564]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adaptlab.adapters.folder import attached_kinds, write_adapter_files
from adaptlab.io import ASIDE_SUFFIX, TEMP_SUFFIX, read_json, save_tensors, write_json
from adaptlab.rundir import Layout
from adaptlab.training.errors import ResumeError
from adaptlab.training.loop import METRICS_FILE
from adaptlab.training.objectives import HEAD_ATTRIBUTE, LinearHead
from adaptlab.training.optim import unwrap_optimizer
from adaptlab.training.parallel import full_state_dict, is_deepspeed, is_fsdp
from adaptlab.training.sharded_state import (
    _PARAM,
    _local,
    _shard_file,
    load_sharded_optimizer,
    load_zero_state,
    sharded_state,
    zero_state,
)

RUN_FILE = "run.json"
RESULT_FILE = "result.json"
CHECKPOINTS = "checkpoints"
BEST = "best"
FINAL = "final"
STATE = "resume"
PREDICTIONS = "predictions"  # per-example outputs: {split}_step_{step}.jsonl
STATE_FILE = "trainer_state.json"
CHECKPOINT_FILE = "adaptlab_checkpoint.json"
HEAD_FILE = "linear_head.safetensors"
_TRAINABLE = "trainable.safetensors"
_OPTIMIZER = "optimizer.pt"
_SCHEDULER = "scheduler.pt"
_METHOD = "method_state.pt"
LAYOUT = Layout(
    "fine-tuning",
    markers=(RUN_FILE, RESULT_FILE),
    owned=(
        RUN_FILE, RESULT_FILE, METRICS_FILE, CHECKPOINTS, BEST, FINAL, STATE, "tensorboard",
        "wandb", PREDICTIONS,
    ),
)  # fmt: skip
"""What a fine-tuning run writes: ``--overwrite`` removes these entries and nothing else."""
# Optimiser attributes that state_dict() leaves out: IVON counts its steps in ``current_step``
# (its momentum debiasing reads it), so a resume without it takes different steps.
_OPTIMIZER_ATTRIBUTES = ("current_step",)


def log_spaced_steps(total_steps: int, n: int) -> list[int]:
    """Checkpoint steps ``unique(round(geomspace(1, T, n, endpoint=False)))`` (landscape.md §4).

    Args:
        total_steps: T, optimiser steps of the run.
        n: number of checkpoints asked for (fewer come back when rounding merges steps).

    Returns:
        Sorted steps in 1..T-1 (``[]`` for n = 0 or T = 1).
    """
    if n <= 0 or total_steps <= 1:
        return []
    steps = np.unique(np.round(np.geomspace(1, total_steps, n, endpoint=False)))
    return [int(s) for s in steps]


def has_results(out: Path) -> bool:
    """Whether a run folder holds anything worth keeping: results, weights or a resume state."""
    kept = (RESULT_FILE, STATE, CHECKPOINTS, BEST, FINAL)
    return any(existing(out / name) is not None for name in kept)


def fingerprint(identity: Mapping[str, Any]) -> str:
    """sha256 of the JSON of ``identity`` (keys sorted): equal runs share it."""
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------
# Atomic folders


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}{ASIDE_SUFFIX}")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` onto ``path``, moving an older ``path`` aside first."""
    old = _aside(path)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def existing(path: Path) -> Path | None:
    """``path``, or its previous version when a kill fell between the two renames of a swap."""
    if path.exists():
        return path
    return _aside(path) if _aside(path).exists() else None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; it becomes ``path`` only on success."""
    path = Path(path)
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove(path: Path) -> None:
    """Delete a folder written by :func:`atomic_dir`, with any leftover of a swap."""
    for candidate in (path, _aside(path), _temporary(path)):
        shutil.rmtree(candidate, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Weights in the HF / PEFT format


def save_weights(
    accelerator: Any,
    model: torch.nn.Module,
    folder: str | Path,
    *,
    adapter: bool,
    tokenizer: Any = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write the model (``adapter``: only the PEFT adapter) to ``folder``, atomically.

    Every process must call it: gathering a sharded (FSDP2, ZeRO-3) model's state dict is a
    collective; for an adapter only the trainable parameters are gathered. Only the main
    process writes.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        model: the prepared (possibly wrapped) model.
        folder: destination; replaced if it exists.
        adapter: save ``adapter_config.json`` + ``adapter_model.safetensors`` only (PEFT's
            folder, or adaptlab's when its own adapters are attached).
        tokenizer: saved next to a whole model, so the folder loads on its own.
        meta: written as ``adaptlab_checkpoint.json``.
    """
    state_dict = full_state_dict(accelerator, model, trainable_only=adapter)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        state_dict, head = split_linear_head(state_dict)
        kinds = attached_kinds(unwrapped)
        with atomic_dir(folder) as tmp:
            if kinds:  # adaptlab's own adapters: every trainable entry, nothing of the base
                adapters, others = _adapter_entries(unwrapped, state_dict, kinds)
                write_adapter_files(tmp, unwrapped, adapters, unwrapped.name_or_path, others)
            else:
                # The vocabulary is never resized here, so PEFT need not look for embedding
                # changes (its check reads the base model's config, which fails for embedded:).
                extra = {"save_embedding_layers": False} if adapter else {}
                unwrapped.save_pretrained(str(tmp), state_dict=state_dict, **extra)
            if head:
                save_tensors(tmp / HEAD_FILE, head)
            if tokenizer is not None and not adapter:
                tokenizer.save_pretrained(str(tmp))
            write_json(tmp / CHECKPOINT_FILE, dict(meta or {}))
    accelerator.wait_for_everyone()


def _adapter_entries(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], kinds: list
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(adapter entries, other trainable entries)`` of ``state_dict`` (names of ``model``).

    A replicated model's state dict holds the frozen base too; only the trainable entries are
    kept, the adapters' apart from anything else that trains.
    """
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    adapters, others = {}, {}
    for name, tensor in state_dict.items():
        if name in trainable:
            belongs = any(kind.is_parameter(name) for kind, _ in kinds)
            (adapters if belongs else others)[name] = tensor
    return adapters, others


def split_linear_head(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(model entries, head entries)``: the attached linear head's tensors, renamed
    ``linear.weight`` / ``linear.bias``, apart from the model's (see ``attach_linear_head``)."""
    model, head = {}, {}
    marker = f"{HEAD_ATTRIBUTE}."
    for name, tensor in state_dict.items():
        if name.startswith(marker) or f".{marker}" in name:
            head[name[name.index(marker) + len(marker) :]] = tensor.detach().cpu().contiguous()
        else:
            model[name] = tensor
    return model, head


def load_linear_head(folder: str | Path) -> LinearHead:
    """The ``LinearHead`` saved in a checkpoint folder of a ``head=linear`` run (float32).

    Raises:
        ResumeError: the folder has no head file.
    """
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        raise ResumeError(f"{folder} holds no {HEAD_FILE}; was the run trained with head=linear?")
    tensors = load_file(str(path))
    n_classes, hidden = tensors["linear.weight"].shape
    head = LinearHead(hidden, n_classes)
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return head


# ---------------------------------------------------------------------------------------------
# Trainer state


@dataclass
class TrainerState:
    """Where a run stands; saved as ``trainer_state.json``.

    Attributes:
        fingerprint: the run's fingerprint (:func:`fingerprint` of its identity).
        config: the run's config, to say what differs when a resume is refused.
        step: optimiser steps done.
        epoch: epoch of the next step.
        batch_in_epoch: position of the next step's batch in its epoch.
        tokens: training tokens seen (all processes).
        train_seconds: time spent in training steps so far.
        eval_seconds: time spent evaluating so far.
        evals: evaluation records so far (``{"step", metrics...}``).
        best: ``{"step", "metric", "value"}`` of the best evaluation, or ``None``.
        checkpoints: checkpoint folders written so far, relative to the run folder.
    """

    fingerprint: str
    config: dict[str, Any]
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    checkpoints: list[str] = field(default_factory=list)


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA generator states, as tensors and plain
    values only (so they load with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(np.uint32),
            saved["pos"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters that train, each once, on the CPU."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            out[name] = param.detach().cpu().clone()
    return out


def state_layout(model: torch.nn.Module) -> str:
    """How the trainable weights and optimiser state of ``model`` are spread over processes.

    ``zero`` (a DeepSpeed engine: one partition per rank), ``fsdp`` (FSDP2 shards the trainable
    weights: one shard per rank) or ``replicated`` (data parallel, one process, or FSDP that
    shards only frozen weights: the main process writes the whole state).
    """
    if is_deepspeed(model):
        return "zero"
    if is_fsdp(model) and any(
        hasattr(p, "to_local") for p in model.parameters() if p.requires_grad
    ):
        return "fsdp"
    return "replicated"


def save_state(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    method_state: Mapping[str, Any],
    state: TrainerState,
    folder: str | Path,
) -> None:
    """Write everything an exact resume needs to ``folder``, atomically; every process calls it.

    The optimiser state is that of the main process: parameters and optimiser states are
    replicated across data-parallel processes (and under FSDP when only frozen weights are
    sharded, see :func:`state_layout`). Under FSDP each process writes its shards
    (:func:`sharded_state`), under ZeRO its partition (:func:`zero_state`) beside the whole
    trainable weights.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        model: the prepared model.
        optimizer: the optimiser (plain or accelerate-wrapped).
        scheduler: the learning-rate scheduler.
        method_state: ``Method.state(model)``.
        state: the trainer state to record.
        folder: destination (``{run}/resume``); replaced if it exists.
    """
    folder = Path(folder)
    tmp = _temporary(folder)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / _rng_file(accelerator.process_index))
    layout = state_layout(model)
    sharded, zero = layout == "fsdp", layout == "zero"
    if sharded or zero:
        tensors, metadata = zero_state(model) if zero else sharded_state(model, optimizer)
        save_tensors(tmp / _shard_file(accelerator.process_index), tensors, metadata)
    if zero:  # the whole trainable weights (CPU copies), gathered from ZeRO-3 partitions
        whole = full_state_dict(accelerator, model, trainable_only=True)
        if accelerator.is_main_process:
            save_tensors(tmp / _TRAINABLE, whole)
    if accelerator.is_main_process:
        if not sharded and not zero:
            save_tensors(tmp / _TRAINABLE, trainable_tensors(accelerator.unwrap_model(model)))
            inner = unwrap_optimizer(optimizer)
            attributes = {a: getattr(inner, a) for a in _OPTIMIZER_ATTRIBUTES if hasattr(inner, a)}
            optimizer_state = {"state_dict": optimizer.state_dict(), "attributes": attributes}
            torch.save(optimizer_state, tmp / _OPTIMIZER)
        torch.save(scheduler.state_dict(), tmp / _SCHEDULER)
        torch.save(dict(method_state), tmp / _METHOD)
        write_json(tmp / STATE_FILE, asdict(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _swap_into_place(tmp, folder)
    accelerator.wait_for_everyone()


def read_state(folder: str | Path) -> TrainerState | None:
    """The trainer state saved in ``folder`` (or its swap leftover), or ``None``."""
    found = existing(Path(folder))
    if found is None or not (found / STATE_FILE).is_file():
        return None
    return TrainerState(**read_json(found / STATE_FILE))


def _load(path: Path) -> Any:
    """A resume file: tensors and plain values only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ResumeError(
            f"{path} is not a resume file this version can read safely ({type(err).__name__}); "
            "start the run afresh (overwrite=true)."
        ) from err


def load_state(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    folder: str | Path,
) -> tuple[TrainerState, dict[str, Any]]:
    """Restore parameters, optimiser, scheduler and this process's RNG from ``folder``.

    Call it on a model, optimiser and scheduler built exactly as for a fresh run, right before
    the first step to run; restore the method state (returned) before the RNG matters.

    Returns:
        The trainer state and the saved method state.

    Raises:
        ResumeError: no state in ``folder``, a state from another number of processes, or
            saved parameters that do not match the model's trainable ones.
    """
    found = existing(Path(folder))
    state = read_state(folder)
    if found is None or state is None:
        raise ResumeError(f"{folder} holds no trainer state to resume from.")
    rng_path = found / _rng_file(accelerator.process_index)
    if not rng_path.is_file():
        raise ResumeError(
            f"{found} was saved by fewer processes than this run has "
            f"({accelerator.num_processes}); resume with the same number of processes."
        )
    layout = state_layout(model)
    shard = found / _shard_file(accelerator.process_index)
    metadata: dict = {}
    if shard.is_file():
        with safe_open(shard, "pt") as handle:
            metadata = handle.metadata() or {}
    saved_layout = metadata.get("layout", "fsdp") if shard.is_file() else "replicated"
    if layout != saved_layout:
        raise ResumeError(
            f"{found} was saved by a {saved_layout} run and this one is {layout}; resume it the "
            "way it was launched."
        )
    tensors = load_file(shard) if shard.is_file() else {}
    if layout == "fsdp":
        saved = {k.removeprefix(_PARAM): v for k, v in tensors.items() if k.startswith(_PARAM)}
    else:
        saved = load_file(found / _TRAINABLE)
    params = dict(accelerator.unwrap_model(model).named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        differ = sorted(set(saved) ^ expected)
        raise ResumeError(
            f"The trainable parameters saved in {found} do not match the model's (e.g. "
            f"{differ[0]}); resume with the method and freezing flags of the saved run."
        )
    if layout == "zero":
        load_zero_state(model, tensors, metadata, saved)
    else:
        with torch.no_grad():
            for name, tensor in saved.items():
                _local(params[name]).copy_(tensor)
    if layout == "fsdp":
        load_sharded_optimizer(optimizer, tensors, metadata)
    elif layout == "replicated":
        optimizer_state = _load(found / _OPTIMIZER)
        optimizer.load_state_dict(optimizer_state["state_dict"])
        for name, value in optimizer_state["attributes"].items():
            setattr(unwrap_optimizer(optimizer), name, value)
    scheduler.load_state_dict(_load(found / _SCHEDULER))
    method_state = _load(found / _METHOD)
    set_rng_state(_load(rng_path))
    return state, method_state


def check_same_run(
    saved_fingerprint: str,
    saved_config: Mapping[str, Any],
    run_fingerprint: str,
    config: Mapping[str, Any],
    where: str | Path,
) -> None:
    """Refuse to continue (or overwrite) a run folder written by a different run.

    Args:
        saved_fingerprint: fingerprint recorded in the folder.
        saved_config: config recorded with it.
        run_fingerprint: this run's fingerprint.
        config: this run's config (same keys as ``saved_config``).
        where: the folder, for the message.

    Raises:
        ResumeError: the fingerprints differ; the message names the config keys that changed
            (or says the data or model files did).
    """
    if saved_fingerprint == run_fingerprint:
        return
    changed = sorted(
        key for key in set(config) | set(saved_config) if config.get(key) != saved_config.get(key)
    )
    what = (
        f"a different config (changed: {', '.join(changed)})"
        if changed
        else "the same config but other data, model files or process count"
    )
    raise ResumeError(
        f"{where} holds a run from {what}; pass that run's config to resume it, or another "
        "output_dir (overwrite=true replaces it)."
    )


# ---------------------------------------------------------------------------------------------
# Keep-best


LOWER_IS_BETTER = frozenset({"loss", "ece"})


def is_better(
    metric: str, value: float, best: Mapping[str, Any] | None, ties: str = "first"
) -> bool:
    """Whether ``value`` of ``metric`` replaces the recorded ``best`` (loss and ECE: lower).

    Args:
        metric: the metric's name.
        value: its value now.
        best: the best record so far (``{"value": ...}``), or ``None``.
        ties: ``first`` keeps the earlier of equal values (strictly better only), ``last``
            the later one (``>=``, upstream's LM-BFF trainer).

    >>> best = {"value": 0.5}
    >>> is_better("accuracy", 0.5, best), is_better("accuracy", 0.5, best, ties="last")
    (False, True)
    """
    if best is None or best["value"] != best["value"]:  # any value beats a NaN (no correlation)
        return True
    if value == best["value"]:
        return ties == "last"
    if metric in LOWER_IS_BETTER:
        return value < best["value"]
    return value > best["value"]

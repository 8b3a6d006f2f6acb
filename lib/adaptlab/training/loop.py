"""The pieces of a fine-tuning run: batches of a step, the training step, evaluation, telemetry.

``scripts/finetune.py`` strings them together; one optimiser step is::

    plan = BatchPlan(len(items), batch_size=16, micro_batch_size=2, world=4, rank=rank, seed=0)
    batches = step_micro_batches(items, plan, step, collate_answer_only, pad_id, device)
    result = train_step(model, optimizer, scheduler, batches, objective, accelerator, method,
                        step + 1)

``TRAIN_DATA[objective].collator(packing, max_seq_len)`` is a run's collate function: padded
batches, or packed ones (several examples per row, ``adaptlab.training.packing``).

Data order is a function of (seed, epoch) only: epoch e visits the training set in the order
``numpy.random.default_rng([seed, e]).permutation(N)``, step s takes batch ``s mod S`` of epoch
``s // S`` (S = N // batch_size, the tail of each epoch is dropped), and process r takes
micro-batches ``a * world + r`` of that batch. A resumed run needs nothing but the step.

Each micro-batch carries its example weights and ``weight_norm`` = (Σ of the step's weights) /
(micro-batches per process x processes), so that with :func:`accumulation_loss_scale` and the
data-parallel gradient mean the step's loss is Σ_i w_i ℓ_i / Σ_i w_i over the whole global
batch, whatever the split into processes and micro-batches (IVON included).

Evaluation (landscape.md §4, §6) scores the last prompt token: full-vocabulary argmax, decoded
and stripped, against the gold letter (``accuracy_*``); argmax over the four letter tokens
(``constrained_*``); ECE of the softmax over those four; and the cross-entropy of the gold
letter token over the vocabulary (``loss``). Micro = over questions, macro = mean over subjects.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adaptlab.data import LETTERS, TokenizedPrompt
from adaptlab.distributed import average_replicated_gradients
from adaptlab.extract.points import unwrap
from adaptlab.extract.runner import pad_batch
from adaptlab.io import atomic_open
from adaptlab.training.answer_only import (
    collate_answer_only,
    collate_packed_answer_only,
    encode_answer_only,
)
from adaptlab.training.l1_to_init import L1ToInit
from adaptlab.training.methods import Method
from adaptlab.training.metrics import accuracy_report, expected_calibration_error
from adaptlab.training.objectives import Objective
from adaptlab.training.optim import (
    TrainingError,
    accumulation_loss_scale,
    ivon_step_context,
    train_mc_samples,
    uses_ivon,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# ---------------------------------------------------------------------------------------------
# Training data per objective


@dataclass(frozen=True)
class TrainData:
    """How an objective's training examples are encoded and batched.

    Attributes:
        encode: ``(examples, tokenizer, max_seq_len, weighted) -> items``; every item is a dict
            with at least ``input_ids`` (list of ids) and ``weight`` (float).
        collate: ``(items, pad_token_id) -> batch`` of tensors with ``attention_mask`` and
            whatever the objective reads.
        pack: ``(items, pad_token_id, max_len) -> batch`` packed into rows (``packing=true``,
            see ``adaptlab.training.packing``), or ``None`` where the objective cannot pack.
    """

    encode: Callable[..., list[Any]]
    collate: Callable[[Sequence[Any], int], dict[str, torch.Tensor]]
    pack: Callable[[Sequence[Any], int, int], dict[str, torch.Tensor]] | None = None

    def collator(
        self, packing: bool, max_seq_len: int
    ) -> Callable[[Sequence[Any], int], dict[str, torch.Tensor]]:
        """The run's ``(items, pad_token_id) -> batch``: padded, or packed into ``max_seq_len``."""
        if not packing:
            return self.collate
        if self.pack is None:
            raise TrainingError("This objective cannot pack its batches; use packing=false.")
        return functools.partial(self.pack, max_len=max_seq_len)


TRAIN_DATA: dict[str, TrainData] = {
    "answer_only": TrainData(
        encode_answer_only, collate_answer_only, pack=collate_packed_answer_only
    ),
}
"""MMLU objectives the fine-tuning script can train, by name (few-shot tasks train
``label_words`` through ``adaptlab.training.fewshot``)."""


# ---------------------------------------------------------------------------------------------
# Schedules of a run


def eval_schedule(total_steps: int, points: int, at_start: bool = False) -> list[int]:
    """Steps after which to evaluate: ``points`` evenly spaced, the last at ``total_steps``.

    Steps are ``unique(max(1, round(T * k / points)))`` for k = 1..points (a count, not an
    interval; landscape.md §4), plus 0 when ``at_start``.

    >>> eval_schedule(100, 4, at_start=True)
    [0, 25, 50, 75, 100]
    """
    steps = {max(1, round(total_steps * k / points)) for k in range(1, points + 1)}
    return sorted(steps | ({0} if at_start else set()))


@dataclass(frozen=True)
class BatchPlan:
    """Which examples every process uses at every optimiser step.

    Attributes:
        n_examples: N, training examples.
        batch_size: G, examples per optimiser step over all processes.
        micro_batch_size: examples per forward pass per process.
        world: number of processes.
        rank: this process.
        seed: seed of the per-epoch order.
    """

    n_examples: int
    batch_size: int
    micro_batch_size: int
    world: int
    rank: int
    seed: int

    def __post_init__(self) -> None:
        per_pass = self.micro_batch_size * self.world
        if self.batch_size % per_pass:
            raise TrainingError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size x processes "
                f"= {self.micro_batch_size} x {self.world}; change one of them."
            )
        if self.n_examples < self.batch_size:
            raise TrainingError(
                f"The training set has {self.n_examples} examples, fewer than batch_size="
                f"{self.batch_size}; lower batch_size or train on more questions."
            )

    @property
    def accumulation(self) -> int:
        """Micro-batches per process per optimiser step."""
        return self.batch_size // (self.micro_batch_size * self.world)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one pass (the last partial batch is dropped)."""
        return self.n_examples // self.batch_size

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch in epoch)`` of optimiser step ``step`` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def global_indices(self, step: int) -> np.ndarray:
        """``[G]`` example indices of step ``step`` (0-based), all processes together."""
        epoch, offset = self.position(step)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)
        return order[offset * self.batch_size : (offset + 1) * self.batch_size]

    def local_micro_indices(self, step: int) -> list[np.ndarray]:
        """This process's micro-batches of step ``step``: ``accumulation`` arrays of indices."""
        rows = self.global_indices(step)
        size = self.micro_batch_size
        return [
            rows[(a * self.world + self.rank) * size : (a * self.world + self.rank + 1) * size]
            for a in range(self.accumulation)
        ]


def step_micro_batches(
    items: Sequence[Mapping[str, Any]],
    plan: BatchPlan,
    step: int,
    collate: Callable[[Sequence[Any], int], dict[str, torch.Tensor]],
    pad_token_id: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """This process's collated micro-batches of step ``step``, with loss weights.

    Returns:
        ``accumulation`` batches on ``device``; each also holds ``weight_norm``, see the module
        docstring.
    """
    weights = np.array([items[i]["weight"] for i in plan.global_indices(step)], dtype=np.float64)
    weight_norm = float(weights.sum()) / (plan.accumulation * plan.world)
    batches = []
    for rows in plan.local_micro_indices(step):
        batch = collate([items[i] for i in rows], pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        batch["weight_norm"] = weight_norm
        batches.append(batch)
    return batches


# ---------------------------------------------------------------------------------------------
# The training step


@dataclass(frozen=True)
class StepResult:
    """What one optimiser step reports.

    Attributes:
        loss: the global batch's training loss (objective only, no regulariser).
        tokens: tokens processed by all processes (MC draws counted once).
        lr: learning rate the step used (first parameter group).
        grad_norm: gradient norm before clipping, when clipping is on.
        l1_to_init: the L1-to-init penalty λ·Σ|θ − θ_init| before the step, when it is on.
    """

    loss: float
    tokens: int
    lr: float
    grad_norm: float | None
    l1_to_init: float | None = None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    micro_batches: Sequence[Mapping[str, Any]],
    objective: Objective,
    accelerator: Any,
    method: Method,
    step: int,
    max_grad_norm: float | None = None,
    penalty: L1ToInit | None = None,
) -> StepResult:
    """One optimiser step over this process's micro-batches.

    Every micro-batch and Monte Carlo draw runs inside :func:`ivon_step_context` (a no-op but
    for IVON); gradients are synchronised across processes only on the last micro-batch, those
    of trainable weights FSDP left whole after the last one (IVON all-reduces its averaged
    samples in ``step()`` instead). Then: the L1-to-init gradient λ·sign(θ − θ_init) when
    ``penalty`` is given (once per step, so accumulation does not scale it), clip,
    ``optimizer.step()``,
    ``scheduler.step()``, ``method.after_step(model, step, optimizer)`` (AdaLoRA's rank allocation,
    which reads the gradients or, for ViLoRA, IVON's posterior), ``zero_grad()``.

    Args:
        model: the prepared model.
        optimizer: the prepared optimiser.
        scheduler: its learning-rate scheduler (stepped once).
        micro_batches: from :func:`step_micro_batches`.
        objective: a value of ``OBJECTIVES``.
        accelerator: the run's ``accelerate.Accelerator``.
        method: the fine-tuning method (regulariser, after-step hook).
        step: 1-based number of this optimiser step.
        max_grad_norm: clip the gradient norm to this; ``None`` does not clip.
        penalty: the L1-to-init penalty (not with IVON, whose gradient samples are read
            before it could be added).

    Returns:
        The step's loss, token count, learning rate, gradient norm and penalty value.
    """
    model.train()
    n_micro = len(micro_batches)
    scale = accumulation_loss_scale(optimizer, n_micro)
    draws = train_mc_samples(optimizer)
    is_ivon = uses_ivon(optimizer)
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = 0
    for i, batch in enumerate(micro_batches):
        syncs = i == n_micro - 1 and not is_ivon
        with contextlib.nullcontext() if syncs else accelerator.no_sync(model):
            for _ in range(draws):
                with ivon_step_context(optimizer):
                    out = objective(model, batch)
                    extra = method.regularizer(model)
                    loss = out.loss if extra is None else out.loss + extra
                    accelerator.backward(loss * scale)
                loss_sum += out.loss.detach().float() / (n_micro * draws)
        tokens += int(batch["attention_mask"].sum())
    if not is_ivon:  # FSDP-ignored trainable weights (IVON, AdaLoRA): average like DDP
        average_replicated_gradients(model)
    l1_to_init = None if penalty is None else penalty.apply(accelerator)
    grad_norm = None
    if max_grad_norm is not None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = float(accelerator.clip_grad_norm_(trainable, max_grad_norm))
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    method.after_step(model, step, optimizer)
    optimizer.zero_grad(set_to_none=True)
    loss_mean = accelerator.reduce(loss_sum, reduction="mean")
    token_total = accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum")
    return StepResult(float(loss_mean), int(token_total), lr, grad_norm, l1_to_init)


# ---------------------------------------------------------------------------------------------
# Evaluation


def _keeps_last_logits(model: nn.Module) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` when the model can skip the head on earlier positions."""
    forward = inspect.signature(unwrap(model).forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in forward else {}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    prompts: Sequence[TokenizedPrompt],
    letter_ids: Mapping[str, int],
    tokenizer: Any,
    accelerator: Any,
    batch_size: int,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every prompt's last token; every process runs the same number of batches.

    Prompts are sorted by length, dealt round-robin to the processes (short processes repeat a
    prompt, dropped after the gather), left-padded with position ids counting real tokens.

    Args:
        model: the (possibly wrapped) model; put back in its previous train/eval mode.
        prompts: ``[N]`` evaluation prompts (``adaptlab.data.tokenize_prompts``).
        letter_ids: ``{"A": id, ...}`` from ``adaptlab.data.answer_letter_ids``.
        tokenizer: decodes the full-vocabulary prediction.
        accelerator: the run's ``accelerate.Accelerator``.
        batch_size: prompts per forward pass per process.
        progress: show a progress bar of this process's prompts (prompts/s).

    Returns:
        ``accuracy_micro``, ``accuracy_macro``, ``constrained_micro``, ``constrained_macro``,
        ``ece``, ``loss``, ``n`` and ``subjects`` (constrained accuracy per subject).
    """
    if not prompts:
        raise TrainingError("The evaluation set is empty; loosen the eval subset options.")
    was_training = model.training
    model.eval()
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    mine = order[rank::world]
    per_rank = math.ceil(len(prompts) / world)
    valid = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [order[0]] * (per_rank - len(mine))
    letters = torch.tensor([letter_ids[x] for x in LETTERS], device=device)
    keep = _keeps_last_logits(model)
    rows = []
    bar = tqdm(total=per_rank, desc="evaluate", unit="prompt", dynamic_ncols=True,
               disable=not progress, leave=False)  # fmt: skip
    for start in range(0, per_rank, batch_size):
        chunk = mine[start : start + batch_size]
        bar.update(len(chunk))
        ids, mask, positions = pad_batch(
            [prompts[i].input_ids for i in chunk], tokenizer.pad_token_id, "left", device
        )
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **keep)
        last = logits.logits[:, -1].float()
        gold = letters[[LETTERS.index(prompts[i].answer) for i in chunk]]
        loss = F.cross_entropy(last, gold, reduction="none")
        meta = torch.tensor(
            [[i, v] for i, v in zip(chunk, valid[start : start + batch_size], strict=True)],
            device=device,
        )
        pred = last.argmax(-1, keepdim=True)
        rows.append(
            torch.cat([meta.double(), last[:, letters].double(), pred.double(), loss[:, None]], 1)
        )
    bar.close()
    table = accelerator.gather(torch.cat(rows)).cpu()
    table = table[table[:, 1] == 1]
    table = table[table[:, 0].argsort()]
    model.train(was_training)

    subjects = [prompts[int(i)].subject for i in table[:, 0]]
    gold = [prompts[int(i)].answer for i in table[:, 0]]
    letter_logits = table[:, 2:6]
    constrained = [LETTERS[int(j)] for j in letter_logits.argmax(1)]
    decoded = [tokenizer.decode([int(t)]).strip() for t in table[:, 6]]
    strict = accuracy_report(constrained, gold, subjects)
    free = accuracy_report(decoded, gold, subjects)
    probs = torch.softmax(letter_logits, dim=1)
    ece = expected_calibration_error(probs, [LETTERS.index(g) for g in gold])
    return {
        "accuracy_micro": free["micro"],
        "accuracy_macro": free["macro"],
        "constrained_micro": strict["micro"],
        "constrained_macro": strict["macro"],
        "ece": ece,
        "loss": float(table[:, 7].mean()),
        "n": len(gold),
        "subjects": strict["subjects"],
    }


# ---------------------------------------------------------------------------------------------
# Telemetry

# Dense bf16 peak FLOP/s by GPU name fragment (vendor data sheets, SXM parts).
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
}


def device_peak_flops(device: torch.device, given: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``given``, else a known GPU's, else ``None`` (CPUs)."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def mfu(
    n_params: int, tokens_per_second: float, peak_flops: float | None, world: int = 1
) -> float | None:
    """Model FLOPs utilisation: 6 N tokens/s / (peak FLOP/s x devices), or ``None``.

    6 N per token counts forward (2N) and backward (4N) of all N parameters, as nanoGPT and
    PaLM do; with frozen weights the true count is lower, so PEFT runs read a little high.
    """
    if peak_flops is None or tokens_per_second <= 0:
        return None
    return 6.0 * n_params * tokens_per_second / (peak_flops * world)


def check_reporter(report_to: str) -> None:
    """Raise :class:`TrainingError` when ``report_to`` needs a package that is missing."""
    if report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TrainingError(
                "report_to=wandb needs the wandb package; pip install wandb, or use "
                "report_to=tensorboard."
            ) from None


class RunLogger:
    """Training and evaluation metrics: ``metrics.jsonl`` always, TensorBoard or W&B on top.

    Only the main process writes. A resumed run first drops the lines of steps after the one it
    resumes from, so the file reads as one uninterrupted run, and a last line that a kill left
    half-written (see :func:`read_metrics`).

    Args:
        folder: the run folder.
        report_to: ``tensorboard``, ``wandb`` or ``none``.
        enabled: whether this process writes (the main one).
        run_name: name in TensorBoard/W&B.
        project: W&B project.
        run_id: stable id of the run (a resumed W&B run continues the same run).
        config: logged to W&B.
        resume_step: the step a resumed run continues from, or ``None``.
    """

    def __init__(
        self,
        folder: Path,
        report_to: str,
        enabled: bool,
        run_name: str,
        project: str,
        run_id: str,
        config: Mapping[str, Any],
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = folder / METRICS_FILE
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(folder) if r["step"] <= resume_step]
            with atomic_open(self.path) as handle:
                handle.writelines(json.dumps(record) + "\n" for record in kept)
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning(
                    "tensorboard is not installed; metrics go to %s only (pip install "
                    "tensorboard to get event files).",
                    self.path,
                )
            else:
                # a resumed run purges the events a killed run logged after its resume state
                purge = None if resume_step is None else resume_step + 1
                self.tensorboard = SummaryWriter(
                    str(folder / "tensorboard" / run_name), purge_step=purge
                )
        elif report_to == "wandb":
            import wandb

            self.wandb = wandb.init(
                project=project,
                name=run_name,
                id=run_id,
                resume="allow",
                config=dict(config),
                dir=str(folder),
            )

    def log(self, step: int, values: Mapping[str, Any], prefix: str) -> None:
        """Record the numeric ``values`` under ``prefix/`` at ``step``."""
        if not self.enabled:
            return
        scalars = {
            f"{prefix}/{key}": float(value)
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(folder: str | Path) -> list[dict[str, float]]:
    """The records of a run's ``metrics.jsonl``, in order.

    A last line without its newline is what a run killed in the middle of a write leaves: it is
    left out, with a warning. Records are appended one whole line at a time, so a line that is
    not JSON anywhere else means the file was damaged.

    Raises:
        TrainingError: a damaged line before the last one.
    """
    path = Path(folder) / METRICS_FILE
    text = path.read_text()
    lines = text.split("\n")
    partial = lines.pop()  # "" when the file ends with a newline, as every complete write does
    if partial:
        logger.warning(
            "Dropped the half-written last line of %s (%d characters; the run was killed while "
            "writing it).",
            path,
            len(partial),
        )
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise TrainingError(
                f"Line {number} of {path} is not a JSON record; the file was damaged: restore "
                "it, or start the run afresh (overwrite=true)."
            ) from None
    return records

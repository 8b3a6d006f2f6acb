"""Fine-tuning building blocks: optimisers, schedules, objectives, metrics and freezing.

- :mod:`~adaptlab.training.optim`: AdamW / SGD / SignGD / IVON by name, no-decay groups, the
  IVON sampling context for every micro-batch (``ivon`` is :mod:`~adaptlab.training.ivon`,
  adaptlab's own; ``ivon_opt``, in :mod:`~adaptlab.training.ivon_optim`, is the GPL-licensed
  ivon-opt package, a test dependency kept for comparisons);
- :mod:`~adaptlab.training.ivon`: IVON written from the paper, per-parameter fp32 state
  (an fp32 mean for bf16 weights), the same posterior draws on every process; the state of
  parameters sharing a group, device and dtype lives in flat buffers
  (:mod:`~adaptlab.training.ivon_flat`), its helpers in :mod:`~adaptlab.training.ivon_ops`;
- :mod:`~adaptlab.training.ivon_predict`: test-time logits averaged over posterior draws
  (an LM's, or a linear head's);
- :mod:`~adaptlab.training.ivon_hessian`: IVON's h saved at the end of a run (and sliced to
  AdaLoRA's final ranks), loaded to start another;
- :mod:`~adaptlab.training.vilora`: ViLoRA's posterior criteria and rank allocator for AdaLoRA
  (fields in :mod:`~adaptlab.training.posterior_settings`); :mod:`~adaptlab.training.vilora_study`:
  the offline study's config and statistics;
- :mod:`~adaptlab.training.schedules`: linear / cosine-to-floor / constant with warmup, and
  ViLoRA's clr;
- :mod:`~adaptlab.training.finetune_run`: the setup and load stages of ``scripts/finetune.py``;
  :mod:`~adaptlab.training.extra_tests`: extra test tasks scored at the end (MNLI mismatched);
- :mod:`~adaptlab.training.objectives`: answer-only causal LM loss (weighted), label-word loss,
  linear head on the first token;
- :mod:`~adaptlab.training.packing`: several examples per row, no attention across them;
- :mod:`~adaptlab.training.metrics`: micro/macro accuracy, ECE and reliability bins, ROUGE and
  BLEU of generated text;
- :mod:`~adaptlab.training.generation`: the generation task ``bbc-headline`` (title + EOS
  labels, batched ``generate``, scores and kept predictions);
- :mod:`~adaptlab.training.freezing`: freeze head / embeddings / first blocks, BitFit;
- :mod:`~adaptlab.training.l1_to_init`: the penalty λ·Σ|θ − θ_init|, added to the gradients
  once per step (accumulation, DDP and FSDP2 shards alike);
- :mod:`~adaptlab.training.parallel`: data parallel, FSDP2 or DeepSpeed ZeRO over the
  processes of a run, whole state dicts from shards;
- :mod:`~adaptlab.training.zero`: the DeepSpeed config, engine and training step;
- :mod:`~adaptlab.training.ivon_zero`: IVON as a ZeRO engine's optimiser (the posterior
  partitioned like the master weights).

A training step with gradient accumulation, correct for every optimiser::

    freeze(model, fix_embeddings=True)
    optimizer = build_optimizer("adamw", model, lr=5e-5)
    scheduler = build_scheduler("cosine", optimizer, total_steps, warmup_ratio=0.05,
                                min_lr_ratio=0.01)
    scale = accumulation_loss_scale(optimizer, len(micro_batches))
    for batch in micro_batches:
        for _ in range(train_mc_samples(optimizer)):
            with ivon_step_context(optimizer):
                (OBJECTIVES["answer_only"](model, batch).loss * scale).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
"""

from __future__ import annotations

from adaptlab.training.answer_only import (
    AnswerOnlyExample,
    answer_only_labels,
    collate_answer_only,
    collate_packed_answer_only,
    encode_answer_only,
)
from adaptlab.training.freezing import ParameterRoles, freeze, parameter_roles
from adaptlab.training.metrics import (
    ReliabilityBins,
    accuracy_report,
    expected_calibration_error,
    reliability_bins,
)
from adaptlab.training.objectives import (
    IGNORE_INDEX,
    OBJECTIVES,
    LinearHead,
    Objective,
    ObjectiveOutput,
    attach_linear_head,
    causal_lm_loss,
    class_loss,
    find_linear_head,
    first_token_positions,
    get_objective,
    label_word_logits,
    label_word_loss,
    last_token_positions,
    mask_positions,
    per_example_lm_loss,
    weighted_mean,
)
from adaptlab.training.optim import (
    OPTIMIZERS,
    OptimizerSettings,
    SignSGD,
    TrainingError,
    accumulation_loss_scale,
    build_optimizer,
    is_norm,
    ivon_step_context,
    param_groups,
    train_mc_samples,
    trainable_parameters,
    unwrap_optimizer,
    uses_ivon,
)
from adaptlab.training.schedules import (
    SCHEDULES,
    ClrSettings,
    ClrShape,
    build_scheduler,
    lr_factor,
    resolve_warmup_steps,
)

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "OPTIMIZERS",
    "SCHEDULES",
    "AnswerOnlyExample",
    "ClrSettings",
    "ClrShape",
    "LinearHead",
    "Objective",
    "ObjectiveOutput",
    "OptimizerSettings",
    "ParameterRoles",
    "ReliabilityBins",
    "SignSGD",
    "TrainingError",
    "accumulation_loss_scale",
    "accuracy_report",
    "answer_only_labels",
    "attach_linear_head",
    "build_optimizer",
    "build_scheduler",
    "causal_lm_loss",
    "class_loss",
    "collate_answer_only",
    "collate_packed_answer_only",
    "encode_answer_only",
    "expected_calibration_error",
    "find_linear_head",
    "first_token_positions",
    "freeze",
    "get_objective",
    "is_norm",
    "ivon_step_context",
    "label_word_logits",
    "label_word_loss",
    "last_token_positions",
    "lr_factor",
    "mask_positions",
    "param_groups",
    "parameter_roles",
    "per_example_lm_loss",
    "reliability_bins",
    "resolve_warmup_steps",
    "train_mc_samples",
    "trainable_parameters",
    "unwrap_optimizer",
    "uses_ivon",
    "weighted_mean",
]

"""Typed configuration of ``scripts/graft.py`` (learn, apply and evaluate a graft mask).

Every field is documented in the class docstring; presets live in ``scripts/configs/graft_*``
and any field can be overridden on the command line::

    python scripts/graft.py --config scripts/configs/graft_demo.yaml --sparsity 1e-3

The data fields (task, task_dir, shots, seed, ...) default to ``None``: the values the
fine-tuning run recorded, so both stages read one data config (upstream truncated inputs
differently between the stages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from adaptlab.graft.errors import GraftError

PATCH_RULES = ("highest_movement", "zero")
"""Named base-patch rules; any other value of ``base_patch`` is a mask folder to start from."""


@dataclass
class GraftConfig:
    """Learn a sparse mask that grafts fine-tuned weights onto the pretrained model
    (Panigrahi et al. 2023), evaluate base, fine-tuned and grafted models, save the mask.

    Args:
        finetuned: θ_ft: a ``scripts/finetune.py`` output folder (its ``best/`` weights, or
            ``final/`` without one; a checkpoint folder inside a run works too), a plain
            Hugging Face model folder, or a PEFT adapter folder (its merged delta is Δ).
        base_model: θ_pre; None: the base the fine-tuning run recorded (or the adapter's base).
        task: few-shot task (a key of ``adaptlab.data.TASKS``); None: the run's.
        task_dir: k-shot data root (``scripts/prepare_fewshot.py``); None: the run's.
        shots: k, examples per label; None: the run's.
        seed: data seed of the k-shot split; None: the run's ``data_seed``.
        kshot_mode: ``k-shot``, ``k-shot-10x`` or ``k-shot-1k-test``; None: the run's.
        template: prompt template; None: the run's (or the task's).
        label_words: label -> word (each one token); None: the run's (or the task's).
        test_limit: evaluate at most this many test examples; None: the run's.
        scoring: ``label_words`` (one-token words at the mask / last prompt token) or
            ``options`` (causal LMs: the log-probability of each class's full option); None:
            the run's.
        ood_tasks: further tasks whose test splits are evaluated too (distribution shift); they
            must have the same labels as ``task`` (``test_limit`` applies to them too).
        fix_head: eligible-set override for a plain model folder (a run's own flags otherwise):
            the head stayed frozen.
        fix_embeddings: likewise, the input embeddings stayed frozen.
        fix_layers: likewise, blocks 0..n-1 (and the embeddings) stayed frozen.
        biases_only: likewise, only biases trained (BitFit).
        sparsity: s, the base patch holds k = ⌊s·N_E⌋ entries of the N_E eligible ones.
        base_patch: ``highest_movement`` (the k entries of largest |Δ|, ties by position),
            ``zero`` (empty: the mask must be learned from nothing), or a mask folder whose
            binary mask is the patch.
        sigmoid_bias: β in γ = b + (1 − 2b)σ(S − β).
        learning_rate: η, the step on the scores S (the paper's 1e7: σ' ≈ 5e-5 at the start).
        mask_steps: mask-learning steps (0: the base patch alone is the graft).
        accumulation: A, batches per mask step (and the training batches scored).
        batch_size: examples per batch of a mask step.
        eval_batch_size: examples per evaluation forward pass.
        deltas_on_device: keep θ_pre, θ_ft, b and S on the accelerator (fast); false: in host
            memory, copied tensor by tensor at every interpolation (for models whose copies do
            not fit next to the model).
        eval_only: evaluate the mask in ``mask`` (no learning).
        mask: a mask folder (``{output_dir}/mask`` of an earlier run) for ``eval_only``.
        save_scores: store the scores S in the mask folder (4 bytes per eligible entry: 28 GB
            for a 7B model), so a later run can start from them; false: the mask's positions,
            Δ there and the patch only (all that applying the graft needs).
        export_model: also write θ_pre + γ_bin ⊙ Δ as a Hugging Face model folder here.
        dtype: ``auto`` (fp32 on CPU, bf16 on GPUs that have it), float32, bfloat16, float16.
        trust_remote_code: allow model code from the hub (off unless you trust the source).
        allow_pickle_weights: load pickle-based ``.bin`` weights (only from a trusted source).
        mask_seed: seed of the score init S ~ U[0, 1) and of the batch order.
        output_dir: where ``mask/``, ``result.json`` and ``reliability.png`` go; running the
            same command again resumes an unfinished run there.
        overwrite: replace an earlier, different graft run in ``output_dir``.
        progress: show progress bars.
        cpu: run on the CPU even when a GPU is present.
        fsdp: shard θ_pre, θ_ft, b, S and the gradients over the processes with FSDP2 (None:
            when launched with an accelerate FSDP config). Several processes need it.
    """

    finetuned: str | None = None
    base_model: str | None = None
    task: str | None = None
    task_dir: str | None = None
    shots: int | None = None
    seed: int | None = None
    kshot_mode: Literal["k-shot", "k-shot-10x", "k-shot-1k-test"] | None = None
    template: str | None = None
    label_words: dict[str, str] | None = None
    test_limit: int | None = None
    scoring: Literal["label_words", "options"] | None = None
    ood_tasks: list[str] = field(default_factory=list)
    fix_head: bool | None = None
    fix_embeddings: bool | None = None
    fix_layers: int | None = None
    biases_only: bool | None = None
    sparsity: float = 1e-4
    base_patch: str = "highest_movement"
    sigmoid_bias: float = 10.0
    learning_rate: float = 1e7
    mask_steps: int = 10
    accumulation: int = 128
    batch_size: int = 8
    eval_batch_size: int = 16
    deltas_on_device: bool = True
    eval_only: bool = False
    mask: str | None = None
    save_scores: bool = True
    export_model: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    mask_seed: int = 0
    output_dir: str = "results/graft"
    overwrite: bool = False
    progress: bool = True
    cpu: bool = False
    fsdp: bool | None = None

    def __post_init__(self) -> None:
        checks = [
            (
                self.finetuned is not None or self.eval_only,
                "--finetuned is required: pass the fine-tuning run (or model) folder to graft.",
            ),
            (
                math.isfinite(self.sparsity) and 0.0 < self.sparsity <= 1.0,
                f"sparsity={self.sparsity} is not in (0, 1]; it is the grafted fraction of the "
                "eligible parameters (the paper uses 1e-5 to 1e-4).",
            ),
            (
                not self.eval_only or self.mask is not None,
                "--eval_only needs --mask DIR, the mask/ folder of an earlier graft run.",
            ),
            (
                self.mask is None or self.eval_only,
                "--mask is read only with --eval_only true; to start learning from a mask pass "
                "it as --base_patch DIR.",
            ),
            (self.mask_steps >= 0, f"mask_steps={self.mask_steps} must be 0 or more."),
            (self.accumulation >= 1, f"accumulation={self.accumulation} must be at least 1."),
            (
                self.batch_size >= 1 and self.eval_batch_size >= 1,
                "batch_size and eval_batch_size must be at least 1.",
            ),
            (
                math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"learning_rate={self.learning_rate} must be positive (the paper uses 1e7).",
            ),
            (math.isfinite(self.sigmoid_bias), "sigmoid_bias must be a finite number."),
            (self.fix_layers is None or self.fix_layers >= 0, "fix_layers must be 0 or more."),
            (self.shots is None or self.shots >= 1, f"shots={self.shots} must be at least 1."),
        ]
        for ok, message in checks:
            if not ok:
                raise GraftError(message)

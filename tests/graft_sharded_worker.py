"""A graft run sharded with FSDP2, launched by tests/test_graft_sharded.py:

    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 \\
        --mixed_precision no tests/graft_sharded_worker.py OUT FINETUNED.safetensors

On a float64 tiny Llama whose θ_pre and Δ lie on coarse binary grids (so |Δ| has many exact
ties), each rank reading only its rows of θ_ft from the safetensors file: the exact top-k patch,
S ~ U[0, 1), two mask steps (3 batches, then 4: one rank pads the odd step with a zero-weighted
batch), then the mask written to ``OUT/mask`` in the single-process artefact layout and, per
rank, ``OUT/rank{r}.json`` with the content hashes, the step records (loss, γ_bin size,
scores) and the fraction of the eligible entries the rank held. The steps run through
``learn_mask``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adaptlab.graft import MaskSettings, Selection, collect, eligible_names, patch_size
from adaptlab.graft.learn import binary_masks, learn_mask
from adaptlab.graft.sharded import (
    content_hash_sharded,
    gather_mask,
    init_scores_sharded,
    safetensors_rows,
    save_parts,
    top_delta_patch_sharded,
)

# β = 0.5 puts σ(S − β) mid-slope at S ~ U[0, 1), so two steps flip entries of γ_bin.
SETTINGS = MaskSettings(lr=2e3, beta=0.5, steps=2)
SPARSITY = 0.03
BATCHES_PER_STEP = {1: 3, 2: 4}
VOCAB = 64


def models() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """θ_pre on a 2⁻¹⁰ grid and θ_ft = θ_pre + Δ with Δ ∈ {0, ±1/64, …, ±4/64}, exact in
    float64, so thousands of entries tie at |Δ| = 4/64."""
    pre = tiny_llama_float64()
    gen = torch.Generator().manual_seed(1)
    finetuned = {
        name: p.detach() + torch.randint(-4, 5, p.shape, generator=gen, dtype=p.dtype) / 64
        for name, p in pre.named_parameters()
    }
    return pre, finetuned


def tiny_llama_float64() -> nn.Module:
    from adaptlab.models.tiny import tiny_llama

    model = tiny_llama(vocab_size=VOCAB, seed=0).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 1024) / 1024)
    return model


def eligible(model: nn.Module) -> list[str]:
    return eligible_names(model, Selection(fix_embeddings=True))


def batches_of_step(step: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, VOCAB, (BATCHES_PER_STEP[step], 2, 6), generator=gen)
    return [{"input_ids": row} for row in ids]


def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def score(model: nn.Module) -> dict[str, dict[str, float]]:
    """Minus the mean loss on step 1's batches as "train", 0 as "dev": a deterministic score
    (every rank runs the same forward passes, which are collectives under FSDP)."""
    with torch.no_grad():
        value = sum(float(loss(model, b)) for b in batches_of_step(1)) / BATCHES_PER_STEP[1]
    return {"train": {"accuracy": -value}, "dev": {"accuracy": 0.0}}


def learn(model: nn.Module, tensors) -> list[dict]:
    """The two mask steps through :func:`adaptlab.graft.learn.learn_mask`; its records."""
    history = learn_mask(model, tensors, SETTINGS, batches_of_step, loss, score, progress=False)
    return history.records


def main(out: Path, finetuned_file: Path) -> None:
    from adaptlab.distributed import dist_info, shutdown
    from adaptlab.training.parallel import shard_fsdp

    info = dist_info(cpu=True)
    model = tiny_llama_float64()
    names = eligible(model)
    model = shard_fsdp(model, info)
    tensors = collect(model, names, safetensors_rows([finetuned_file]))
    k = patch_size(SPARSITY, tensors.n_eligible)
    tensors.base = top_delta_patch_sharded(tensors, k)
    tensors.scores = init_scores_sharded(tensors, torch.Generator().manual_seed(3))
    records = learn(model, tensors)
    parts = gather_mask(tensors, binary_masks(tensors, SETTINGS.beta))
    record = {
        "world": tensors.world,
        "k": k,
        "records": records,
        "held": sum(t.numel() for t in tensors.pre) / tensors.n_eligible,
        "hash_pre": content_hash_sharded(tensors, tensors.pre),
        "hash_ft": content_hash_sharded(tensors, tensors.ft),
    }
    if parts is not None:
        save_parts(out / "mask", {"eligible": names}, parts)
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))
    shutdown(info)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

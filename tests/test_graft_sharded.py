"""Grafting under FSDP2 over two CPU processes equals the one-process run (graft.md §3–§5).

tests/graft_sharded_worker.py shards a float64 tiny Llama with FSDP2 (accelerate_configs/
fsdp.yaml, 2 processes, gloo), reads its rows of θ_ft from a safetensors file, computes the exact
top-k patch on a Δ full of ties, runs two mask steps and writes the mask in the artefact layout;
here the same run goes through the whole-tensor API in one process (``top_delta_patch``,
``init_scores``, ``save_mask``, ``content_hash``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptlab.graft import collect, patch_size
from adaptlab.graft.artefact import MASK_FILE, content_hash, save_mask
from adaptlab.graft.learn import binary_masks
from adaptlab.graft.mask import init_scores
from adaptlab.graft.patch import top_delta_patch
from adaptlab.graft.sharded import split_batches
from tests import graft_sharded_worker as worker
from tests.conftest import ROOT, free_port


def one_process(out):
    """The worker's run, whole tensors, one process; the mask saved by ``save_mask``."""
    model, finetuned = worker.models()
    names = worker.eligible(model)
    tensors = collect(model, names, finetuned)
    k = patch_size(worker.SPARSITY, tensors.n_eligible)
    tensors.base = top_delta_patch([tensors.delta(i) for i in range(len(tensors))], k)
    gen = torch.Generator().manual_seed(3)
    tensors.scores = init_scores([p.shape for p in tensors.params], gen, torch.float64, "cpu")
    initial = [s.clone() for s in tensors.scores]
    records = worker.learn(model, tensors)
    masks = binary_masks(tensors, worker.SETTINGS.beta)
    save_mask(
        out,
        {"eligible": names},
        dict(zip(names, masks, strict=True)),
        {n: tensors.delta(i) for i, n in enumerate(names)},
        dict(zip(names, tensors.base, strict=True)),
        dict(zip(names, tensors.scores, strict=True)),
    )
    hashes = (
        content_hash(dict(zip(names, tensors.pre, strict=True)), names),
        content_hash(dict(zip(names, tensors.ft, strict=True)), names),
    )
    return tensors, initial, k, records, hashes


@pytest.mark.multiprocess
def test_two_fsdp_processes_graft_like_one(tmp_path):
    out = tmp_path / "two"
    out.mkdir()
    launcher = [
        "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/fsdp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip
    finetuned = tmp_path / "finetuned.safetensors"
    save_file(worker.models()[1], finetuned)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests" / "graft_sharded_worker.py"
    cmd = [sys.executable, "-m", *launcher, str(script), str(out), str(finetuned)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]

    tensors, initial, k, records, hashes = one_process(tmp_path / "one")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # each rank held half of the eligible entries: Δ, S and b were sharded, not replicated
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["held"] for r in ranks] == pytest.approx([0.5, 0.5], abs=0.02)
    for r in ranks:
        assert r["k"] == k
        assert (r["hash_pre"], r["hash_ft"]) == hashes
        # per step: mean loss, γ_bin size (summed over the ranks), train score
        assert [e["n_grafted"] for e in r["records"]] == [e["n_grafted"] for e in records]
        assert r["records"][0]["train_loss"] is None  # step 0: the base patch, no update
        for got, expected in zip(r["records"], records, strict=True):
            assert got["train"] == pytest.approx(expected["train"], rel=1e-12)
            if got["step"]:
                assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-12)

    got, expected = (load_file(d / MASK_FILE) for d in (out / "mask", tmp_path / "one"))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key.startswith("scores/"):
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12, msg=key)
        else:  # the patch, the binary mask and Δ there: identical
            assert torch.equal(got[key], value), key
    assert (out / "mask" / "graft_config.json").read_bytes() == (
        tmp_path / "one" / "graft_config.json"
    ).read_bytes()

    # the run tested what it should: exactly k entries, the cut falls inside a tie, S moved
    # and γ_bin differs from b
    magnitudes = torch.cat([tensors.delta(i).abs().reshape(-1) for i in range(len(tensors))])
    chosen = torch.cat([b.reshape(-1) for b in tensors.base])
    threshold = magnitudes[chosen].min()
    assert int(chosen.sum()) == k
    assert int((magnitudes == threshold).sum()) > int((chosen & (magnitudes == threshold)).sum())
    assert (
        max(float((a - b).abs().max()) for a, b in zip(tensors.scores, initial, strict=True)) > 0.05
    )
    flipped = binary_masks(tensors, worker.SETTINGS.beta)
    assert any(not torch.equal(m, b) for m, b in zip(flipped, tensors.base, strict=True))


def test_batches_are_split_by_rank_and_padded_with_zero_weight():
    batches = [{"i": torch.tensor(i)} for i in range(5)]
    shares = [split_batches(batches, rank, 2) for rank in (0, 1)]
    assert [[int(b["i"]) for b, _ in s] for s in shares] == [[0, 2, 4], [1, 3, 0]]
    assert [[w for _, w in s] for s in shares] == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    assert split_batches(batches, 0, 1) == [(b, 1.0) for b in batches]


def test_sharded_helpers_in_one_process_equal_the_whole_tensor_api():
    from adaptlab.graft.sharded import (
        content_hash_sharded,
        gather_mask,
        init_scores_sharded,
        top_delta_patch_sharded,
    )

    model, finetuned = worker.models()
    names = worker.eligible(model)
    tensors = collect(model, names, finetuned)
    deltas = [tensors.delta(i) for i in range(len(tensors))]
    for k in (0, 1, 500, tensors.n_eligible):
        patch = top_delta_patch_sharded(tensors, k)
        assert all(
            torch.equal(a, b) for a, b in zip(patch, top_delta_patch(deltas, k), strict=True)
        )
    scores = init_scores_sharded(tensors, torch.Generator().manual_seed(3))
    reference = init_scores(
        [p.shape for p in tensors.params], torch.Generator().manual_seed(3), torch.float64, "cpu"
    )
    assert all(torch.equal(a, b) for a, b in zip(scores, reference, strict=True))
    pre = dict(zip(names, tensors.pre, strict=True))
    assert content_hash_sharded(tensors, tensors.pre) == content_hash(pre, names)
    tensors.base = patch
    parts = gather_mask(tensors, patch)
    assert int(sum(t.numel() for t in parts.index.values())) == tensors.n_eligible

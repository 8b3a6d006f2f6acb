"""The grafting engine (graft.md §3–§5) against independent computations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import AutoModelForMaskedLM

from adaptlab.graft import (
    GraftError,
    MaskSettings,
    Selection,
    apply_graft,
    collect,
    eligible_names,
    export_model,
    load_mask,
    mask_step,
    patch_size,
    top_delta_patch,
)
from adaptlab.graft.artefact import content_hash, save_mask
from adaptlab.graft.learn import binary_masks, gammas, prepare_model
from adaptlab.graft.mask import binary, gamma, init_scores
from adaptlab.models.tiny import tiny_bert, tiny_llama


def pair(dtype=torch.float64, seed=0, kind="bert"):
    """θ_pre and a 'fine-tuned' θ_ft = θ_pre + noise on every parameter."""
    make = tiny_bert if kind == "bert" else tiny_llama
    pre = make(vocab_size=64, seed=seed).to(dtype)
    ft = copy.deepcopy(pre)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return pre, ft


def batches(n=3, size=4, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(5, 64, (size, length), generator=gen),
            "positions": torch.randint(0, length, (size,), generator=gen),
            "targets": torch.randint(0, 3, (size,), generator=gen),
        }
        for _ in range(n)
    ]


WORDS = torch.tensor([7, 11, 13])


def loss_fn(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits
    rows = torch.arange(logits.shape[0])
    scores = logits[rows, batch["positions"]][:, WORDS]
    return F.cross_entropy(scores, batch["targets"])


def setup_tensors(pre, ft, sparsity=0.01, selection=None):
    names = eligible_names(pre, selection or Selection(fix_embeddings=True))
    tensors = collect(pre, names, dict(ft.named_parameters()))
    k = patch_size(sparsity, tensors.n_eligible)
    tensors.base = top_delta_patch([tensors.delta(i) for i in range(len(tensors))], k)
    gen = torch.Generator().manual_seed(3)
    tensors.scores = init_scores(
        [p.shape for p in tensors.params], gen, tensors.pre[0].dtype, tensors.device
    )
    return tensors


def test_mask_update_equals_autograd_through_gamma():
    pre, ft = pair()
    tensors = setup_tensors(pre, ft)
    data = batches()
    settings = MaskSettings(lr=1e7, beta=10.0)
    # a few entries near β so that σ' is not tiny everywhere
    tensors.scores[0].view(-1)[:5] = torch.tensor([9.5, 10.0, 10.5, 8.0, 12.0], dtype=torch.float64)
    s0 = [s.clone() for s in tensors.scores]

    # independent: S a leaf, θ(γ(S)) by functional_call, mean over batches of the loss, autograd
    leaves = [s.clone().requires_grad_(True) for s in s0]
    frozen = {n: p.detach() for n, p in pre.named_parameters()}
    deltas = [tensors.ft[i] - tensors.pre[i] for i in range(len(tensors))]
    grafted = dict(frozen)
    for i, name in enumerate(tensors.names):
        g = gamma(tensors.base[i], leaves[i], settings.beta)
        grafted[name] = tensors.pre[i] + g * deltas[i]
    reference = copy.deepcopy(pre).eval()
    total = sum(loss_fn(_Bound(reference, grafted), b) for b in data) / len(data)
    grads = torch.autograd.grad(total, leaves)
    expected = [s - settings.lr * g for s, g in zip(s0, grads, strict=True)]

    prepare_model(pre, tensors)
    mask_step(pre, tensors, data, loss_fn, settings)
    worst = max(float((a - b).abs().max()) for a, b in zip(tensors.scores, expected, strict=True))
    moved = max(float((a - b).abs().max()) for a, b in zip(tensors.scores, s0, strict=True))
    assert worst < 1e-10
    assert moved > 1e-3  # the step did something measurable
    for i, p in enumerate(tensors.params):  # θ is back at θ_pre
        assert torch.equal(p, tensors.pre[i])


class _Bound(torch.nn.Module):
    """A model called with substituted parameters (for the autograd reference)."""

    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, **kwargs):
        return functional_call(self.model, self.params, args=(), kwargs=kwargs)


def logits_of(model, data):
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"]).logits for b in data])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gamma_one_is_finetuned_and_zero_is_pretrained_exactly(dtype):
    pre, ft = pair(dtype=dtype)
    original = copy.deepcopy(pre)
    names = eligible_names(pre, Selection())
    tensors = collect(pre, names, dict(ft.named_parameters()))
    data = batches(n=1)
    for gamma_value, target in ((1.0, ft), (0.0, original)):
        for setter in (
            lambda g=gamma_value: tensors.set_fractional([g] * len(tensors)),
            lambda g=gamma_value: tensors.set_fractional(
                [torch.full(p.shape, g) for p in tensors.params]
            ),
            lambda g=gamma_value: tensors.set_binary(
                [torch.full(p.shape, bool(g)) for p in tensors.params]
            ),
        ):
            setter()
            assert torch.equal(logits_of(pre, data), logits_of(target, data))
    tensors.reset()
    for a, b in zip(pre.parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b)


def reference_patch(deltas, k):
    """numpy: sort by (-|Δ|, position) over the concatenated Δ, take k."""
    flat = np.concatenate([d.reshape(-1).numpy() for d in deltas])
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))[:k]
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[order] = True
    return chosen


@pytest.mark.parametrize("k", [0, 1, 7, 40, 99, 106])
def test_patch_takes_exactly_k_largest_with_ties_by_position(k):
    gen = torch.Generator().manual_seed(0)
    # heavy ties: values on a coarse grid, both signs
    deltas = [
        torch.randint(-4, 5, shape, generator=gen).float() / 4
        for shape in [(5, 7), (11,), (3, 4, 5)]
    ]
    masks = top_delta_patch(deltas, k)
    got = np.concatenate([m.reshape(-1).numpy() for m in masks])
    assert got.sum() == k
    assert np.array_equal(got, reference_patch(deltas, k))


def test_patch_size_and_bad_sparsity():
    assert patch_size(1e-4, 85_054_464) == 8505
    assert patch_size(1.0, 10) == 10
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(GraftError, match="sparsity"):
            patch_size(bad, 100)


def test_gamma_and_binary_mask():
    base = torch.tensor([False, False, True, True, False, True])
    scores = torch.tensor([0.3, 10.5, 0.3, 10.5, 10.0, 10.0], dtype=torch.float64)
    g = gamma(base, scores, 10.0)
    assert torch.allclose(g[:2], torch.sigmoid(scores[:2] - 10))
    assert torch.allclose(g[2:4], 1 - torch.sigmoid(scores[2:4] - 10))
    # round(γ), with γ = 1/2 rounding to 0
    assert binary(base, scores, 10.0).tolist() == [False, True, True, False, False, False]
    assert binary(base, scores, 10.0).tolist() == torch.round(g).bool().tolist()


def test_eligible_follows_the_finetuning_selector():
    model = tiny_bert(vocab_size=64)
    everything = eligible_names(model, Selection())
    layers = eligible_names(model, Selection(fix_head=True, fix_embeddings=True))
    assert set(layers) < set(everything)
    assert all(".encoder.layer." in n for n in layers)
    assert len([n for n in layers if ".layer.0." in n]) == len(
        [n for n in layers if ".layer.1." in n]
    )
    biases = eligible_names(model, Selection(biases_only=True))
    assert biases and all(n.endswith("bias") for n in biases)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert Selection.from_run_config({"fix_layers": 1}) == Selection(
        fix_embeddings=True, fix_first_n_layers=1
    )
    assert Selection.from_run_config({"method": "bitfit"}).biases_only


def save_learned(tensors, folder, beta=10.0):
    masks = binary_masks(tensors, beta)
    names = tensors.names
    by_name = dict(zip(names, tensors.params, strict=True))
    config = {
        "eligible": [{"name": n, "shape": list(p.shape)} for n, p in by_name.items()],
        "base_model": {
            "name": "tiny",
            "hash": content_hash(dict(zip(names, tensors.pre, strict=True)), names),
        },
        "finetuned_model": {
            "name": "tiny-ft",
            "hash": content_hash(dict(zip(names, tensors.ft, strict=True)), names),
        },
    }
    save_mask(
        folder,
        config,
        dict(zip(names, masks, strict=True)),
        {n: tensors.delta(i) for i, n in enumerate(names)},
        dict(zip(names, tensors.base, strict=True)),
        dict(zip(names, tensors.scores, strict=True)),
    )
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_artefact_and_export_rebuild_the_grafted_model_exactly(dtype, tmp_path):
    pre, ft = pair(dtype=dtype)
    pristine = copy.deepcopy(pre)
    tensors = setup_tensors(pre, ft, sparsity=0.02)
    tensors.scores[1].view(-1)[:3] = 11.0  # flip a few entries away from the patch
    masks = save_learned(tensors, tmp_path / "mask")
    data = batches(n=2)
    tensors.set_binary(masks)
    expected = logits_of(pre, data)
    tensors.reset()

    model = copy.deepcopy(pristine)
    graft = apply_graft(model, tmp_path / "mask")
    graft.merge()
    assert torch.equal(logits_of(model, data), expected)
    graft.unmerge()
    for a, b in zip(model.parameters(), pristine.parameters(), strict=True):
        assert torch.equal(a, b)
    graft.merge()
    export_model(model, tmp_path / "exported")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "exported", dtype=dtype).eval()
    assert torch.equal(logits_of(loaded, data), expected)
    mask = load_mask(tmp_path / "mask")
    assert mask.n_grafted == sum(int(m.sum()) for m in masks)
    for i, name in enumerate(tensors.names):
        assert torch.equal(mask.dense(name), masks[i])
        assert torch.equal(mask.dense(name, "base"), tensors.base[i])
        assert torch.equal(mask.scores[name], tensors.scores[i])


def test_mask_of_another_model_and_damaged_files_are_refused(tmp_path):
    pre, ft = pair(dtype=torch.float32)
    tensors = setup_tensors(pre, ft)
    save_learned(tensors, tmp_path / "mask")
    other = tiny_bert(vocab_size=64, seed=5)
    with pytest.raises(GraftError, match="differ from the base"):
        apply_graft(other, tmp_path / "mask")
    wider = tiny_bert(vocab_size=64, hidden_size=48, intermediate_size=96)
    with pytest.raises(GraftError, match="another architecture"):
        apply_graft(wider, tmp_path / "mask")
    with pytest.raises(GraftError, match="holds no graft_config.json"):
        apply_graft(pre, tmp_path)
    (tmp_path / "mask" / "graft_mask.safetensors").write_bytes(b"garbage")
    with pytest.raises(GraftError, match="damaged"):
        apply_graft(pre, tmp_path / "mask")
    (tmp_path / "mask" / "graft_mask.safetensors").unlink()
    with pytest.raises(GraftError, match="no graft_mask.safetensors"):
        apply_graft(pre, tmp_path / "mask")


def test_fractional_graft_is_the_interpolation():
    pre, ft = pair(dtype=torch.float64)
    tensors = setup_tensors(pre, ft)
    g = gammas(tensors, 10.0)
    tensors.set_fractional(g)
    for i, p in enumerate(tensors.params):
        assert torch.allclose(
            p, tensors.pre[i] + g[i] * (tensors.ft[i] - tensors.pre[i]), atol=1e-15
        )
    tensors.reset()

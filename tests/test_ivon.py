"""adaptlab's IVON against spec §6 by hand, the true curvature of a quadratic, and ivon-opt."""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adaptlab.training.errors import TrainingError
from adaptlab.training.ivon import IVON
from adaptlab.training.optim import (
    accumulation_loss_scale,
    build_optimizer,
    ivon_step_context,
    train_mc_samples,
    uses_ivon,
)
from tests.conftest import free_port, requires_ivon, shared_ivon_noise


def fixed_noise(monkeypatch: pytest.MonkeyPatch, draws: list[list[list[torch.Tensor]]]) -> None:
    """Make IVON's standard normal draws the given ones, in order (one entry per draw)."""
    queue = list(draws)
    monkeypatch.setattr(IVON, "_standard_normals", lambda self, train, draw=None: queue.pop(0))


def test_two_steps_equal_the_spec_formulas_by_hand(monkeypatch):
    """Two steps of two MC draws each on ℓ(θ) = Σ ½ a θ² + ⅓ θ³, recomputed in float64."""
    a = np.array([1.0, 2.0, 3.0])
    m = np.array([0.5, -1.0, 2.0])
    zs = [np.array([0.3, -1.2, 0.8]), np.array([-0.5, 0.4, 1.5]),
          np.array([1.1, 0.2, -0.7]), np.array([-0.9, -0.3, 0.6])]  # fmt: skip
    lr, ess, h0, beta1, beta2, wd, rho = 0.1, 10.0, 0.5, 0.9, 0.99, 0.1, 5.0
    theta = nn.Parameter(torch.tensor(m, dtype=torch.float32))
    optimizer = IVON([theta], lr=lr, ess=ess, hess_init=h0, beta1=beta1, beta2=beta2,
                     weight_decay=wd, mc_samples=2, clip_radius=rho)  # fmt: skip
    fixed_noise(monkeypatch, [[[torch.tensor(z, dtype=torch.float32)]] for z in zs])

    h, g = np.full(3, h0), np.zeros(3)
    clipped = []
    for t in (1, 2):
        sigma = 1 / np.sqrt(ess * (h + wd))
        eps = [z * sigma for z in zs[2 * (t - 1) : 2 * t]]
        grads = [a * (m + e) + (m + e) ** 2 for e in eps]
        for e in eps:
            with optimizer.sampled_params(train=True):
                assert np.allclose(theta.detach().numpy(), m + e, atol=1e-6)  # θ_s = m + ε_s
                loss = (0.5 * torch.tensor(a, dtype=torch.float32) * theta**2 + theta**3 / 3).sum()
                loss.backward()
            assert np.allclose(theta.detach().numpy(), m, atol=1e-6)  # m restored
        optimizer.step()
        g_hat = np.mean(grads, 0)
        h_hat = np.mean([e * gr for e, gr in zip(eps, grads, strict=True)], 0) * ess * (h + wd)
        g = beta1 * g + (1 - beta1) * g_hat
        h = beta2 * h + (1 - beta2) * h_hat + 0.5 * (1 - beta2) ** 2 * (h - h_hat) ** 2 / (h + wd)
        direction = (g / (1 - beta1**t) + wd * m) / (h + wd)
        clipped.append(np.abs(direction) > rho)
        m = m - lr * (h0 + wd) * np.clip(direction, -rho, rho)

        state = optimizer.state[theta]
        assert np.allclose(state["momentum"].numpy(), g, rtol=1e-6, atol=1e-6)
        assert np.allclose(state["hess"].numpy(), h, rtol=1e-6, atol=1e-6)
        assert np.allclose(theta.detach().numpy(), m, rtol=1e-6, atol=1e-6)
    assert any(c.any() and not c.all() for c in clipped)  # the clip acted, on some entries


def test_price_hessian_converges_to_the_curvature_of_a_quadratic():
    """ℓ = Σ ½ a_i θ_i², one draw per step: E[ĥ] = a σ² λ(h + δ) = a, so h → a.

    With β2 = 0.99 the EMA's fixed point lies (1 − β2) Var(ĥ) / (2a) ≈ (1 − β2) a = 1% above a
    (ĥ = a z², Var(ĥ) = 2a²), and its noise, sd ≈ √((1 − β2)/2) √2 a ≈ 0.1 a per entry, falls
    below 0.001 a averaged over 2000 entries and the last 400 steps. Hence 3%.
    """
    curvature = torch.tensor([0.5, 1.0, 2.0, 4.0])[:, None]
    theta = nn.Parameter(torch.zeros(4, 2000))
    optimizer = IVON([theta], lr=0.05, ess=1.0, hess_init=1.0, beta2=0.99, weight_decay=0.0)
    means = []
    for step in range(1200):
        with optimizer.sampled_params(train=True):
            (0.5 * curvature * theta**2).sum().backward()
        optimizer.step()
        if step >= 800:
            means.append(optimizer.state[theta]["hess"].mean(1))
    ratio = torch.stack(means).mean(0) / curvature[:, 0]
    assert torch.allclose(ratio, torch.ones(4), atol=0.03), ratio


def small_regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    return model, torch.randn(8, 3), torch.randn(8, 1)


@requires_ivon
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_trajectory_equals_ivon_opt_given_the_same_noise(hess_approx, monkeypatch):
    """10 steps of 2 draws, two parameter groups with their own lr and weight decay."""
    import ivon

    shared_ivon_noise(monkeypatch)
    ours, data, target = small_regression()
    theirs, start = copy.deepcopy(ours), copy.deepcopy(ours)

    def groups(model):
        return [
            {"params": list(model[0].parameters()), "lr": 0.1, "weight_decay": 1e-3},
            {"params": list(model[2].parameters()), "lr": 0.05, "weight_decay": 1e-2},
        ]

    settings = dict(ess=100.0, hess_init=0.3, beta2=0.999, mc_samples=2, clip_radius=0.2,
                    hess_approx=hess_approx)  # fmt: skip
    mine = IVON(groups(ours), lr=0.1, **settings)
    reference = ivon.IVON(groups(theirs), lr=0.1, **settings)
    for _ in range(10):
        for model, optimizer in ((ours, mine), (theirs, reference)):
            for _ in range(2):
                model.zero_grad()  # ivon-opt reads p.grad as it is
                with optimizer.sampled_params(train=True):
                    nn.functional.mse_loss(model(data), target).backward()
            optimizer.step()
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-6)
        for group, their_group in zip(mine.param_groups, reference.param_groups, strict=True):
            hess = torch.cat([mine.state[p]["hess"].flatten() for p in group["params"]])
            assert torch.allclose(hess, their_group["hess"], rtol=1e-6, atol=1e-6)
    moved = [
        (p - q).abs().max() for p, q in zip(ours.parameters(), start.parameters(), strict=True)
    ]
    assert min(moved) > 1e-3


def test_accumulated_micro_batches_equal_one_batch_with_the_same_noise(monkeypatch):
    """Two half-batch samples (mean loss each) with one ε give the full batch's mean loss."""
    model, data, target = small_regression()
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    zs = [[[torch.randn(p.shape, generator=generator) for p in model.parameters()]]
          for _ in range(3)]  # fmt: skip
    monkeypatch.setattr(
        IVON, "_standard_normals", lambda self, train, draw=None: zs[self.param_groups[0]["step"]]
    )
    settings = dict(lr=0.2, ess=50.0, hess_init=0.5, beta2=0.99, weight_decay=1e-2)
    split, whole = IVON(model.parameters(), **settings), IVON(twin.parameters(), **settings)
    for _ in range(3):
        for rows in (slice(0, 4), slice(4, 8)):
            with split.sampled_params(train=True):
                nn.functional.mse_loss(model(data[rows]), target[rows]).backward()
        split.step()
        with whole.sampled_params(train=True):
            nn.functional.mse_loss(twin(data), target).backward()
        whole.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
        for key in ("hess", "momentum"):
            assert torch.allclose(split.state[p][key], whole.state[q][key], rtol=1e-5, atol=1e-6)


def sync_worker(rank: int, world: int, port: int, folder) -> None:
    """One process of a data-parallel run: its half of the batch, ``sync=True``."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model, data, target = small_regression()
        optimizer = IVON(model.parameters(), lr=0.2, ess=50.0, hess_init=0.5, beta2=0.99,
                         weight_decay=1e-2, sync=True)  # fmt: skip
        rows = slice(4 * rank, 4 * rank + 4)
        for _ in range(3):
            with optimizer.sampled_params(train=True):
                nn.functional.mse_loss(model(data[rows]), target[rows]).backward()
            optimizer.step()
        hess = [optimizer.state[p]["hess"] for p in model.parameters()]
        torch.save(
            {"params": [p.detach() for p in model.parameters()], "hess": hess},
            folder / f"{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_synced_processes_equal_one_process_on_the_whole_batch(tmp_path):
    """Both processes draw the same noise, so the all-reduced halves equal the whole batch."""
    mp.spawn(sync_worker, args=(2, free_port(), tmp_path), nprocs=2)
    model, data, target = small_regression()
    optimizer = IVON(model.parameters(), lr=0.2, ess=50.0, hess_init=0.5, beta2=0.99,
                     weight_decay=1e-2)  # fmt: skip
    for _ in range(3):
        with optimizer.sampled_params(train=True):
            nn.functional.mse_loss(model(data), target).backward()
        optimizer.step()
    for rank in range(2):
        saved = torch.load(tmp_path / f"{rank}.pt")
        for p, q, h in zip(model.parameters(), saved["params"], saved["hess"], strict=True):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
            assert torch.allclose(optimizer.state[p]["hess"], h, rtol=1e-5, atol=1e-6)


def quadratic_steps(optimizer: IVON, params: list[nn.Parameter], steps: int) -> None:
    for _ in range(steps):
        for _ in range(2):  # two micro-batches
            with optimizer.sampled_params(train=True):
                sum((p.float() ** 2).sum() + p.float().sin().sum() for p in params).backward()
        optimizer.step()


def test_state_dict_round_trip_continues_identically():
    """Resumed from its state dict, a copy takes the same steps (same seeded noise too).

    One group holds a bf16 weight: its state stays fp32 through the round trip.
    """
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(4).bfloat16())]
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.05, "weight_decay": 0.1}]
    settings = dict(lr=0.3, ess=20.0, hess_init=0.5, beta2=0.999, seed=7)
    optimizer = IVON(groups, **settings)
    quadratic_steps(optimizer, params, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = IVON([{"params": copies[:1]}, {"params": copies[1:]}], **settings)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[1]["lr"] == 0.05 and resumed.param_groups[1]["step"] == 3
    quadratic_steps(optimizer, params, 3)
    quadratic_steps(resumed, copies, 3)
    for p, q in zip(params, copies, strict=True):
        assert q.dtype == p.dtype and torch.equal(p, q)
        for key in ("hess", "momentum"):
            assert resumed.state[q][key].dtype == torch.float32
            assert torch.equal(optimizer.state[p][key], resumed.state[q][key])


def test_state_between_steps_is_hess_and_momentum_only():
    """The step's sample sums live from its first sample to ``step()``: between steps the
    state of an fp32 weight is two fp32 copies of it, as ivon-opt's (bf16: plus the master)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5).bfloat16())]
    optimizer = IVON(params, lr=0.1, ess=10.0)
    quadratic_steps(optimizer, params, 1)
    with optimizer.sampled_params(train=True):
        sum(p.float().sum() for p in params).backward()
    assert {"grad_sum", "nxg_sum", "samples"} <= set(optimizer.state[params[0]])  # mid-step
    optimizer.step()
    assert set(optimizer.state[params[0]]) == {"hess", "momentum"}
    assert set(optimizer.state[params[1]]) == {"hess", "momentum", "master"}
    full = optimizer.state[params[0]]
    assert sum(t.numel() * t.element_size() for t in full.values()) == 2 * 4 * params[0].numel()
    saved = optimizer.state_dict()["state"]
    assert set(saved[0]) == {"hess", "momentum"} and set(saved[1]) == {"hess", "momentum", "master"}


def test_a_state_dict_with_zero_sample_sums_still_resumes_exactly():
    """State dicts saved between steps by the older IVON hold zero sums and a zero count."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2, 3))]
    settings = dict(lr=0.3, ess=20.0, hess_init=0.5, beta2=0.999, seed=7)
    optimizer = IVON(params, **settings)
    quadratic_steps(optimizer, params, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    for state in saved["state"].values():
        state.update(grad_sum=torch.zeros_like(state["hess"]), samples=0)
        state["nxg_sum"] = torch.zeros_like(state["hess"])
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = IVON(copies, **settings)
    resumed.load_state_dict(saved)
    assert all(set(resumed.state[q]) == {"hess", "momentum"} for q in copies)
    quadratic_steps(optimizer, params, 2)
    quadratic_steps(resumed, copies, 2)
    for p, q in zip(params, copies, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["hess"], resumed.state[q]["hess"])


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_foreach_path_equals_the_per_parameter_path(hess_approx):
    """Several shapes, a bf16 weight (master copy), a weight without gradient, two groups
    (one clipping), two draws a step, and prediction draws: both paths agree to 1e-7."""

    def build(foreach: bool) -> tuple[list[nn.Parameter], IVON]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(*shape)) for shape in [(4, 3), (4,), (2, 4), (2,)]]
        params += [nn.Parameter(torch.randn(3, 2).bfloat16()), nn.Parameter(torch.randn(6))]
        groups = [
            {"params": params[:2]},
            {"params": params[2:], "lr": 0.05, "weight_decay": 0.1, "clip_radius": 0.02},
        ]
        optimizer = IVON(groups, lr=0.3, ess=20.0, hess_init=0.5, beta2=0.99, mc_samples=2,
                         hess_approx=hess_approx, seed=4, foreach=foreach)  # fmt: skip
        return params, optimizer

    runs = {foreach: build(foreach) for foreach in (True, False)}
    assert [b.foreach for b in runs[True][1]._buckets()] == [True, True, True]  # fp32, bf16
    assert not any(b.foreach for b in runs[False][1]._buckets())
    weights = torch.arange(1.0, 13.0)
    predictions = {}
    for foreach, (params, optimizer) in runs.items():
        predictions[foreach] = []
        for _ in range(4):
            for _ in range(2):
                with optimizer.sampled_params(train=True):
                    loss = sum((weights[: p.numel()] * p.float().flatten() ** 2).sum()
                               + p.float().sin().sum() ** 3 for p in params[:-1])  # fmt: skip
                    loss.backward()
            optimizer.step()
            with optimizer.sampled_params(train=False):
                predictions[foreach].append(torch.cat([p.float().flatten() for p in params]))
    (mine, fast), (theirs, slow) = runs[True], runs[False]
    for p, q in zip(mine, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-7)
        for key in fast.state[p]:
            torch.testing.assert_close(fast.state[p][key], slow.state[q][key], rtol=1e-7, atol=1e-7)
    for a, b in zip(predictions[True], predictions[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    moved = [float((p - q).detach().abs().max()) for p, q in zip(mine, build(True)[0], strict=True)]
    assert min(moved) > 1e-4


def test_draws_depend_on_seed_step_and_sample_only():
    """Equal seeds draw alike (every process of a run); each sample and step draws anew."""
    params = [nn.Parameter(torch.zeros(6)) for _ in range(2)]
    first, second = IVON(params, lr=0.1, ess=1.0), IVON(params, lr=0.1, ess=1.0)
    other_seed = IVON(params, lr=0.1, ess=1.0, seed=1)

    def noise(optimizer, record=True):
        mean = torch.cat([p.detach().clone() for p in params])
        with optimizer.sampled_params(train=record):
            perturbed = torch.cat([p.detach().clone() for p in params])
            if record:
                sum(p.sum() for p in params).backward()
        return perturbed - mean

    a = noise(first)
    assert torch.equal(a, noise(second)) and not torch.equal(a, noise(other_seed))
    assert not torch.equal(noise(first), a)  # the second sample of the step
    assert not torch.equal(noise(first, record=False), a)  # prediction draws count apart
    first.step()  # h moved: compare the standard normal draws z = ε √(λ(h + δ))
    scale = torch.cat([(first.state[p]["hess"] + 1e-4).sqrt() for p in params])
    assert not torch.allclose(noise(first) * scale, a, atol=1e-3)


def test_bf16_weights_take_the_fp32_update_rounded_once():
    """A linear loss has the same gradient at any draw, so bf16 and fp32 twins see alike."""
    start = torch.randn(16, generator=torch.Generator().manual_seed(0)).bfloat16()
    slope = torch.arange(-8.0, 8.0) / 4  # exact in bf16, so both twins get the same gradient
    low, full = nn.Parameter(start.clone()), nn.Parameter(start.float())
    optimizers = [IVON([p], lr=0.5, ess=10.0, weight_decay=0.1, seed=3) for p in (low, full)]
    for param, optimizer in zip((low, full), optimizers, strict=True):
        with optimizer.sampled_params(train=True):
            (slope * param.float()).sum().backward()
        optimizer.step()
    assert low.dtype == torch.bfloat16 and torch.equal(low, full.detach().bfloat16())
    assert optimizers[0].state[low]["hess"].dtype == torch.float32
    assert torch.equal(optimizers[0].state[low]["hess"], optimizers[1].state[full]["hess"])


def test_hess_stats_summarise_every_entry():
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))]
    optimizer = IVON(params, lr=0.1, ess=1.0)
    optimizer.hess_stats()  # creates the state
    optimizer.state[params[0]]["hess"].copy_(torch.tensor([1.0, 2.0, 3.0]))
    optimizer.state[params[1]]["hess"].fill_(4.0)
    stats = optimizer.hess_stats()
    assert stats == pytest.approx(
        {"mean": 2.5, "std": math.sqrt(1.25), "min": 1.0, "median": 2.0, "max": 4.0}
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr": 0.0}, "lr=0.0 must be positive"),
        ({"ess": 0.0}, "ess=0.0 must be positive"),
        ({"hess_init": -1.0}, "hess_init=-1.0 must be positive"),
        ({"beta1": 1.0}, r"beta1=1.0 is outside \[0, 1\)"),
        ({"beta2": -0.1}, r"beta2=-0.1 is outside \[0, 1\)"),
        ({"mc_samples": 0}, "mc_samples=0 must be at least 1"),
        ({"clip_radius": 0.0}, "clip_radius=0.0 must be positive"),
        ({"hess_approx": "fisher"}, "Unknown IVON hess_approx 'fisher'"),
        ({"weight_decay": -1e-4}, "weight_decay=-0.0001 is negative"),
    ],
    ids=["lr", "ess", "hess_init", "beta1", "beta2", "mc_samples", "clip", "approx", "decay"],
)
def test_bad_settings_fail_in_one_sentence(settings, message):
    arguments = {"lr": 0.1, "ess": 10.0, **settings}
    with pytest.raises(TrainingError, match=message):
        IVON([nn.Parameter(torch.zeros(2))], **arguments)


def test_step_without_a_gradient_sample_is_an_error():
    param = nn.Parameter(torch.zeros(2))
    optimizer = IVON([param], lr=0.1, ess=10.0)
    param.sum().backward()  # a backward outside sampled_params records nothing
    with pytest.raises(TrainingError, match="no gradient sample.*sampled_params"):
        optimizer.step()


def test_ivon_is_built_by_name_and_needs_no_ivon_opt(monkeypatch):
    """The training loop's helpers treat it as IVON, also behind accelerate's wrapper."""
    monkeypatch.setitem(sys.modules, "ivon", None)  # `import ivon` now fails

    class Wrapped:  # accelerate's AcceleratedOptimizer keeps the optimiser as `.optimizer`
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    layer = nn.Linear(3, 1)
    optimizer = build_optimizer(
        "ivon", layer, lr=0.1, weight_decay=1e-4, ivon_ess=8, ivon_mc_samples=2,
        ivon_seed=5,
    )  # fmt: skip
    assert isinstance(optimizer, IVON) and optimizer.seed == 5 and optimizer.mc_samples == 2
    wrapped = Wrapped(optimizer)
    assert uses_ivon(wrapped) and train_mc_samples(wrapped) == 2
    assert accumulation_loss_scale(wrapped, 4) == 1.0  # IVON averages its samples itself
    before = layer.weight.detach().clone()
    with ivon_step_context(wrapped, train=False):
        assert not torch.equal(layer.weight.detach(), before)  # a posterior draw
    assert torch.equal(layer.weight.detach(), before)
    with pytest.raises(TrainingError, match="ivon_ess"):
        build_optimizer("ivon", layer, lr=0.1)


def test_hess_summary_reads_each_optimiser_independently():
    """The logged summary equals statistics computed here from the optimiser's own state."""
    from adaptlab.training.optim import hess_summary

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = IVON(params, lr=0.1, ess=100.0, hess_init=0.5, beta2=0.5, seed=3)
    for _ in range(2):
        with optimizer.sampled_params(train=True):
            loss = sum((p**2 * torch.arange(1, p.numel() + 1).view_as(p)).sum() for p in params)
            loss.backward()
        optimizer.step()
    values = torch.cat([optimizer.state[p]["hess"].flatten() for p in params])
    summary = hess_summary(optimizer)
    assert summary["hess_mean"] == pytest.approx(float(values.mean()))
    assert summary["hess_std"] == pytest.approx(float(values.std(correction=0)))
    assert summary["hess_max"] == pytest.approx(float(values.max()))
    assert summary["hess_median"] == pytest.approx(
        float(values.sort().values[(len(values) - 1) // 2])
    )
    assert summary["hess_mean"] != pytest.approx(0.5)  # h moved from hess_init
    assert hess_summary(torch.optim.AdamW(params)) == {}

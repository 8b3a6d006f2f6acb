"""ViLoRA's posterior criteria and rank allocator (peft_methods.md §8, §9) against independent
computations: Monte Carlo draws of the folded normal, scores worked out by hand, σ read back by
parameter name from an optimiser built over a shuffled parameter list, triplet scores and the
cubic budget by hand; then tiny runs: the final budget, an AdaLoRA folder with a rank-0 module
reloading to the same logits, and a killed-and-resumed ViLoRA run equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
from safetensors.torch import load_file

from adaptlab.models import load_model
from adaptlab.models.tiny import tiny_llama, tiny_tokenizer
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.errors import TrainingError
from adaptlab.training.ivon import IVON
from adaptlab.training.methods import METHODS, check_method
from adaptlab.training.vilora import (
    CRITERIA,
    PosteriorRankAllocator,
    element_scores,
    folded_normal_mean,
    posterior_sigmas,
)
from tests.conftest import load_script, requires_ivon
from tests.test_finetune import args_for

finetune = load_script("finetune")
VOCAB = len(tiny_tokenizer())
TARGETS = ["q_proj", "v_proj"]  # 2 blocks: 4 matrices
ADAPTLAB_IVON = "ivon"
"""The config name of adaptlab's own IVON."""


def vilora_model(criterion: str = "SNR_mean_abs", total: int = 6, **settings):
    cfg = FinetuneConfig(method="adalora", optimizer=ADAPTLAB_IVON, vilora_criterion=criterion,
                         target_modules=TARGETS, lora_dropout=0.0,
                         **{"adalora_init_r": 4, "adalora_target_r": 2, "adalora_tinit": 1,
                            "adalora_tfinal": 1, "adalora_delta_t": 1, **settings})  # fmt: skip
    return METHODS["adalora"].prepare(tiny_llama(vocab_size=VOCAB), cfg, total)


def adapter_matrices(model) -> dict[str, torch.nn.Parameter]:
    """``{name under the PEFT wrapper: parameter}`` of every lora_A/E/B (the allocator's names)."""
    tuner = model.base_model
    return {n: p for n, p in tuner.model.named_parameters() if "lora_" in n and p.requires_grad}


def test_folded_normal_mean_and_snr_equal_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, 0.3, -1.2, 2.0, -0.05], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.5, 0.7, 0.1, 0.2], dtype=torch.float64)
    n = 200_000
    draws = (mu + sigma * torch.randn(n, 5, generator=generator, dtype=torch.float64)).abs()
    mc_mean, mc_sd = draws.mean(0), draws.std(0)
    standard_error = mc_sd / math.sqrt(n)
    assert ((folded_normal_mean(mu, sigma) - mc_mean).abs() < 4 * standard_error).all()
    # SNR(|θ|) = E|θ| / sd|θ|: the sd from the score equals the sample sd to a few SE of a sd
    sd = folded_normal_mean(mu, sigma) / element_scores("SNR_mean_abs", mu, sigma).double()
    assert ((sd - mc_sd).abs() < 4 * mc_sd / math.sqrt(2 * n) + 1e-6).all()


def test_every_criterion_on_a_hand_set_posterior():
    mu = torch.tensor([0.0, 1.0, -2.0])
    sigma = torch.tensor([1.0, 0.5, 2.0])
    # E|θ| = μ erf(μ/(σ√2)) + σ√(2/π) exp(−μ²/2σ²): √(2/π); erf(√2) + ½√(2/π)e⁻²;
    # 2 erf(1/√2) + 2√(2/π)e^(−1/2). SNR(|θ|) = E|θ| / √(μ² + σ² − E|θ|²).
    expected = {
        "SNR": [0.0, 2.0, 1.0],
        "mean": [0.0, 1.0, 2.0],
        "sigma": [1.0, 2.0, 0.5],
        "E_mean_abs": [0.7978845608, 1.0084907026, 2.3332618824],
        "SNR_mean_abs": [1.3236080968, 2.0895068605, 1.4594609952],
    }
    assert set(expected) == set(CRITERIA)
    for name, values in expected.items():
        torch.testing.assert_close(element_scores(name, mu, sigma), torch.tensor(values))
    # |μ| ≫ σ: the direct formula cancels in fp32, the score is E|θ|/σ → |μ|/σ
    far = element_scores("SNR_mean_abs", torch.tensor([3.0]), torch.tensor([1e-4]))
    torch.testing.assert_close(far, torch.tensor([3e4]))


def test_nan_scores_are_zero():
    mu = torch.tensor([0.5, 0.0, 1.0])
    sigma = torch.tensor([math.nan, 0.0, 1.0])  # σ of a negative h + wd; 0/0 for SNR
    for name in CRITERIA:
        score = element_scores(name, mu, sigma)
        assert score[0] == (0.5 if name == "mean" else 0) and not score.isnan().any(), name
    assert element_scores("SNR", mu, sigma)[1] == 0
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = IVON([param], lr=0.1, ess=10.0, weight_decay=0.0)
    optimizer.state[param]["hess"] = torch.tensor([-1.0, 1.0, 4.0])
    sigmas = posterior_sigmas(optimizer)[id(param)]
    assert sigmas[0].isnan() and sigmas[1:].tolist() == pytest.approx([10**-0.5, 40**-0.5])
    assert element_scores("sigma", param, sigmas).tolist() == pytest.approx([0, 10**0.5, 40**0.5])


def hess_by_name(names: list[str]) -> dict[str, float]:
    return {name: 0.5 + i for i, name in enumerate(names)}


def test_sigma_is_found_by_parameter_identity_whatever_the_optimiser_order():
    from accelerate import Accelerator

    matrices = adapter_matrices(vilora_model())
    names = list(matrices)
    random.Random(0).shuffle(names)
    hess = hess_by_name(names)
    optimizer = IVON([matrices[n] for n in names], lr=0.1, ess=8.0, weight_decay=0.5)
    before_step = posterior_sigmas(optimizer)  # no state yet: h = hess_init = 1
    for name, param in matrices.items():
        optimizer.state[param]["hess"] = torch.full(param.shape, hess[name])
    wrapped = Accelerator(cpu=True).prepare(optimizer)
    for sigmas in (posterior_sigmas(optimizer), posterior_sigmas(wrapped)):
        for name, param in matrices.items():
            assert sigmas[id(param)].shape == param.shape
            expected = 1 / math.sqrt(8.0 * (hess[name] + 0.5))
            assert torch.allclose(sigmas[id(param)], torch.tensor(expected, dtype=torch.float64))
            assert torch.allclose(
                before_step[id(param)], torch.tensor(1 / math.sqrt(8 * 1.5)).double()
            )


@requires_ivon
def test_sigma_is_sliced_from_ivon_opts_flat_buffer_by_parameter_identity():
    import ivon

    matrices = adapter_matrices(vilora_model())
    names = list(matrices)
    random.Random(1).shuffle(names)
    hess = hess_by_name(names)
    groups = [
        {"params": [matrices[n] for n in names[:5]]},
        {"params": [matrices[n] for n in names[5:]]},
    ]
    optimizer = ivon.IVON(groups, lr=0.1, ess=8.0, weight_decay=0.5)
    for group in optimizer.param_groups:  # the flat buffer in the optimiser's own order
        group["hess"] = torch.cat(
            [
                torch.full((p.numel(),), hess[n])
                for n in names
                for p in group["params"]
                if p is matrices[n]
            ]
        )
    sigmas = posterior_sigmas(optimizer)
    for name, param in matrices.items():
        expected = 1 / math.sqrt(8.0 * (hess[name] + 0.5))
        assert torch.allclose(sigmas[id(param)], torch.tensor(expected, dtype=torch.float64))


def test_a_posterior_criterion_refuses_an_optimiser_without_a_posterior():
    model = vilora_model()
    with pytest.raises(TrainingError, match="reads IVON's posterior, but the optimiser is SGD"):
        posterior_sigmas(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TrainingError, match="no optimiser to read σ from"):
        model.base_model.rankallocator.update_scores(model.base_model.model)


def test_triplet_scores_and_mask_equal_a_hand_computation():
    model = vilora_model("mean", adalora_init_r=3)
    matrices = adapter_matrices(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in matrices.values():
            param.copy_(torch.randn(param.shape, generator=generator))
    allocator = model.base_model.rankallocator
    allocator.optimizer = IVON(list(matrices.values()), lr=0.1, ess=8.0)
    allocator.update_scores(model.base_model.model)
    # S_k = |E_k| + mean_j |A_kj| + mean_i |B_ik| ("mean": s = |μ|), for every module
    values = {name: param.detach().tolist() for name, param in matrices.items()}
    triplets = {}
    for name, e in values.items():
        if ".lora_E." in name:
            a, b = (
                values[name.replace("lora_E", "lora_A")],
                values[name.replace("lora_E", "lora_B")],
            )
            triplets[name] = [
                abs(e[k][0])
                + sum(abs(x) for x in a[k]) / len(a[k])
                + sum(abs(row[k]) for row in b) / len(b)
                for k in range(3)
            ]
    everything = sorted(s for scores in triplets.values() for s in scores)
    budget = 5  # of 4 modules x 3: drop the 7 lowest
    expected = {name: [s > everything[6] for s in scores] for name, scores in triplets.items()}
    pattern = allocator.mask_to_budget(model.base_model.model, budget)
    assert pattern == expected and sum(map(sum, pattern.values())) == budget
    for name, keep in pattern.items():  # dropped singular values are zeroed
        assert (matrices[name][~torch.tensor(keep)] == 0).all()


def test_tied_scores_mask_exactly_the_budget_by_position():
    """All triplets tie (s = 1/σ with h everywhere at hess_init): PEFT's S ≤ kthvalue rule would
    mask all 12; ours drops the b0 − b first ones in named_parameters() order."""
    model = vilora_model("sigma", adalora_init_r=3)
    matrices = adapter_matrices(model)
    allocator = model.base_model.rankallocator
    allocator.optimizer = IVON(list(matrices.values()), lr=0.1, ess=8.0, hess_init=0.5)
    allocator.update_scores(model.base_model.model)
    pattern = allocator.mask_to_budget(model.base_model.model, 5)
    flags = [keep for name in matrices if ".lora_E." in name for keep in pattern[name]]
    assert flags == [False] * 7 + [True] * 5


def test_random_control_scores_are_seeded_by_the_step():
    model = vilora_model("random", adalora_init_r=3)
    inner, allocator = model.base_model.model, model.base_model.rankallocator
    draws = []
    for step in (4, 4, 5):
        allocator.step = step
        allocator.update_scores(inner)
        draws.append({name: s.clone() for name, s in allocator.scores.items()})
    assert set(draws[0]) == set(adapter_matrices(model))
    assert all(torch.equal(draws[0][n], draws[1][n]) for n in draws[0])
    assert not any(torch.equal(draws[0][n], draws[2][n]) for n in draws[0])
    assert all(((s >= 0) & (s < 1)).all() for s in draws[0].values())


def test_budget_follows_the_cubic_schedule():
    model = vilora_model(total=30, adalora_init_r=6, adalora_tinit=4, adalora_tfinal=6)
    allocator = model.base_model.rankallocator
    b0, bt = 6 * 4, 2 * 4
    # b(t) = ⌊bT + (b0 − bT)(1 − (t − tinit)/(T − tfinal − tinit))³⌋ between tinit and T − tfinal
    assert allocator.budget_schedule(4)[0] == b0
    assert allocator.budget_schedule(14)[0] == math.floor(bt + (b0 - bt) * 0.5**3) == 10
    assert allocator.budget_schedule(9)[0] == math.floor(bt + (b0 - bt) * 0.75**3) == 14
    assert allocator.budget_schedule(24)[0] == allocator.budget_schedule(25)[0] == bt


@pytest.mark.parametrize(
    ("total", "delta_t", "expected"),
    [(12, 3, [3, 6, 9]), (10, 10, [7])],  # the second: the final mask (t = 7) scores once
    ids=["on-the-grid", "forced-final-mask"],
)
def test_scores_are_recomputed_only_when_the_rule_says(total, delta_t, expected, monkeypatch):
    model = vilora_model("SNR", total, adalora_tinit=2, adalora_tfinal=3, adalora_delta_t=delta_t)
    optimizer = IVON(list(adapter_matrices(model).values()), lr=0.1, ess=8.0)
    scored: list[int] = []
    update = PosteriorRankAllocator.update_scores
    step = 0

    def recording(self, inner):
        scored.append(step)
        update(self, inner)

    monkeypatch.setattr(PosteriorRankAllocator, "update_scores", recording)
    for step in range(1, total + 1):
        METHODS["adalora"].after_step(model, step, optimizer)
    assert scored == expected
    pattern = model.base_model.peft_config["default"].rank_pattern
    assert sum(map(sum, pattern.values())) == 2 * 4


def train(model, optimizer, steps: range, ids: torch.Tensor) -> None:
    for step in steps:
        with optimizer.sampled_params(train=True):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        METHODS["adalora"].after_step(model, step, optimizer)
        optimizer.zero_grad()


@pytest.mark.parametrize("criterion", [*CRITERIA, "random"])
def test_a_tiny_vilora_run_ends_at_the_target_budget(criterion):
    torch.manual_seed(0)
    model = vilora_model(criterion, total=6, adalora_delta_t=2)
    # ViLoRA's β2 0.99999: h barely moves in 6 steps, so 1/σ ties across triplets; the mask
    # still keeps exactly the budget (PEFT's S ≤ threshold would drop every tied triplet)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = IVON(trained, lr=0.2, ess=100.0, beta2=0.99999)
    train(model, optimizer, range(1, 7), torch.randint(0, VOCAB, (2, 8)))
    pattern = model.base_model.peft_config["default"].rank_pattern
    assert len(pattern) == 4 and sum(map(sum, pattern.values())) == 2 * 4
    for name, param in adapter_matrices(model).items():
        if ".lora_E." in name:  # masked singular values stay 0, kept ones trained
            keep = torch.tensor(pattern[name])
            assert (param[~keep] == 0).all() and (param[keep] != 0).all()
    assert model.base_model.rankallocator.scores == {}  # reset after the final mask


@requires_ivon
def test_a_tiny_vilora_run_with_ivon_opt_ends_at_the_target_budget():
    from adaptlab.training.ivon_optim import CheckedIVON
    from adaptlab.training.optim import ivon_step_context

    torch.manual_seed(1)
    model = vilora_model("SNR", total=6, adalora_delta_t=2)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = CheckedIVON(trained[::-1], lr=0.2, ess=100.0, beta2=0.9)  # another order
    ids = torch.randint(0, VOCAB, (2, 8))
    for step in range(1, 7):
        with ivon_step_context(optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        METHODS["adalora"].after_step(model, step, optimizer)
        optimizer.zero_grad()
    pattern = model.base_model.peft_config["default"].rank_pattern
    assert sum(map(sum, pattern.values())) == 2 * 4
    for name, param in adapter_matrices(model).items():
        if ".lora_E." in name:
            assert (param[~torch.tensor(pattern[name])] == 0).all()


def test_budget_check_says_tinit_plus_tfinal_must_be_below_the_steps():
    cfg = FinetuneConfig(
        method="adalora", target_modules=TARGETS, adalora_tinit=3, adalora_tfinal=2
    )
    with pytest.raises(
        TrainingError, match=r"tinit \+ adalora_tfinal < total steps.*= 5 and the run has 5"
    ):
        check_method(cfg, tiny_llama(vocab_size=VOCAB), 5)
    check_method(cfg, tiny_llama(vocab_size=VOCAB), 6)


def test_adapter_with_a_rank_0_module_reloads_at_its_ranks_with_equal_logits(tmp_path):
    from accelerate import Accelerator

    from adaptlab.training.checkpoint import save_weights

    torch.manual_seed(4)
    base_dir = tmp_path / "base"
    tiny_llama(vocab_size=VOCAB).save_pretrained(base_dir)
    cfg = FinetuneConfig(method="adalora", target_modules=TARGETS, adalora_init_r=4,
                         adalora_target_r=2, adalora_tinit=1, adalora_tfinal=1,
                         lora_dropout=0.0)  # fmt: skip
    model = METHODS["adalora"].prepare(load_model(base_dir), cfg, 6)
    tuner = model.base_model
    names = sorted(n for n in adapter_matrices(model) if ".lora_E." in n)
    keeps = [[False] * 4, [True, False, False, False], [True, True, False, True], [True] * 4]
    pattern = dict(zip(names, keeps, strict=True))  # as the allocator writes it
    with torch.no_grad():
        for param in adapter_matrices(model).values():
            param.normal_(std=1.0)
    tuner.peft_config["default"].rank_pattern = pattern
    tuner.rankallocator.mask_using_rank_pattern(tuner.model, pattern)
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        plain = load_model(base_dir)(input_ids=ids).logits
    save_weights(Accelerator(cpu=True), model, tmp_path / "adapter", adapter=True)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert config["rank_pattern"] == {n.removesuffix(".default"): k for n, k in pattern.items()}
    config["base_model_name_or_path"] = str(base_dir)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = load_model(tmp_path / "adapter")
    assert not [w for w in caught if "rank_pattern" in str(w.message)]
    ranks = {n.removeprefix("base_model.model.").removesuffix(".default"): tuple(p.shape)
             for n, p in reloaded.named_parameters() if ".lora_E." in n}  # fmt: skip
    assert ranks == {n.removesuffix(".default"): (sum(k), 1) for n, k in pattern.items()}
    assert saved[f"base_model.model.{names[0].removesuffix('.default')}"].shape == (0, 1)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the check below can tell adapter from none
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


VILORA = [
    "--method", "adalora", "--optimizer", ADAPTLAB_IVON, "--lr", "0.2", "--ivon_ess", "1e5",
    "--vilora_criterion", "SNR_mean_abs", "--adalora_init_r", "4", "--adalora_target_r", "2",
    "--adalora_tinit", "1", "--adalora_tfinal", "1", "--adalora_delta_t", "3",
]  # fmt: skip
"""6 steps: scores at t = 3 (masked), reused by the forced final mask at t = 5."""


def test_killed_and_resumed_vilora_run_equals_uninterrupted(
    tiny_model_dir, mmlu_file, tmp_path, monkeypatch
):
    masks: dict[str, list[dict[str, torch.Tensor]]] = {"whole": [], "killed": []}
    mask_to_budget = PosteriorRankAllocator.mask_to_budget
    run = "whole"

    def recording(self, model, budget):  # the scores each mask ranks by
        masks[run].append({n: s.clone() for n, s in self.scores.items()})
        return mask_to_budget(self, model, budget)

    monkeypatch.setattr(PosteriorRankAllocator, "mask_to_budget", recording)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finetune.main(args_for(tiny_model_dir, mmlu_file, whole, *VILORA))
    step = finetune.train_step

    def killed_at_step_5(*args, **kwargs):
        if args[7] == 5:
            raise KeyboardInterrupt("killed")
        return step(*args, **kwargs)

    run = "killed"
    monkeypatch.setattr(finetune, "train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(args_for(tiny_model_dir, mmlu_file, killed, *VILORA))
    saved = torch.load(killed / "resume" / "method_state.pt", weights_only=True)
    assert len(saved["scores"]) == 3 * 2 * 7  # step 3's scores of every lora_A/E/B
    monkeypatch.setattr(finetune, "train_step", step)
    finetune.main(args_for(tiny_model_dir, mmlu_file, killed, *VILORA))

    assert len(masks["whole"]) == 2 and len(masks["killed"]) == 2  # t = 3, then t = 5
    for used, again in zip(masks["whole"], masks["killed"], strict=True):
        assert used.keys() == again.keys()
        for name in used:  # the final mask reuses step 3's scores, resumed or not
            assert torch.allclose(used[name], again[name], rtol=1e-6, atol=0), name
    configs = [
        json.loads((r / "final" / "adapter_config.json").read_text()) for r in (whole, killed)
    ]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    assert sum(map(sum, configs[0]["rank_pattern"].values())) == 2 * 2 * 7
    a = load_file(whole / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key


def test_sensitivity_of_a_module_without_gradient_is_zero():
    """A module the loss never reaches (a pooler under a linear head) has no gradient: its
    sensitivity EMA is 0 and the others follow (1 − β1)|θ ⊙ g| after one step."""
    model = vilora_model("sensitivity")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    matrices = adapter_matrices(model)
    unreached = [n for n in matrices if "layers.1.self_attn.v_proj" in n]
    for name in unreached:
        matrices[name].grad = None
    expected = {
        n: (p * p.grad).abs() * (1 - 0.85) for n, p in matrices.items() if p.grad is not None
    }
    METHODS["adalora"].after_step(model, 1, torch.optim.SGD(matrices.values(), lr=0.0))
    ema = model.base_model.rankallocator.exp_avg_ipt
    assert all((ema[n] == 0).all() for n in unreached)
    assert all(torch.allclose(ema[n], value) for n, value in expected.items())

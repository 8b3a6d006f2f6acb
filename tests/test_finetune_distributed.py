"""scripts/finetune.py over two CPU processes: data parallel, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

Every two-process run trains the tiny Llama with LoRA for 4 steps of a global batch of 4 and must
give the loss curve and final adapter of one process with the same global batch, while its
result.json shows what each rank held (FSDP2 and ZeRO-3: half of the weights; FSDP2, ZeRO-2 and
ZeRO-3: half of the optimiser state). AdaLoRA and IVON, which keep the adapter whole on every
rank (FSDP shards only the frozen base), are checked the same way. The processes join a gloo
group and run the code a GPU cluster runs. The first ZeRO run JIT-builds DeepSpeed's CPU
communication op (~1 min, cached).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adaptlab.models.tiny import save_tiny_llama
from adaptlab.training.loop import read_metrics
from adaptlab.training.optim import TrainingError
from adaptlab.training.parallel import (
    Strategy,
    check_strategy,
    read_deepspeed_config,
    requested_strategy,
)
from adaptlab.training.zero import fill_deepspeed_config
from tests.conftest import ROOT, free_port, load_script, requires_ivon

finetune = load_script("finetune")
CONFIGS = ROOT / "accelerate_configs"
SCRIPT = ROOT / "scripts" / "finetune.py"
KILLED_AT = """
import sys
sys.path.insert(0, {root!r})
from tests.conftest import load_script
{patch}
finetune = load_script("finetune")


def killed(step):
    def run(*args, **kwargs):
        if args[7] == {step}:
            raise SystemExit(3)
        return step(*args, **kwargs)

    return run


finetune.train_step = killed(finetune.train_step)
finetune.zero_train_step = killed(finetune.zero_train_step)
finetune.main(sys.argv[1:])
"""
SHARED_IVON_DRAWS = """
from adaptlab.training.ivon_optim import CheckedIVON
from tests.test_finetune_distributed import shared_ivon_draw

CheckedIVON._sample_params = shared_ivon_draw
"""


def killed_script(folder: Path, step: int, patch: str = "") -> Path:
    """A copy of scripts/finetune.py that exits before optimiser step ``step`` (a kill)."""
    script = folder / "killed.py"
    script.write_text(KILLED_AT.format(root=str(ROOT), step=step, patch=patch))
    return script


def shared_ivon_draw(self):
    """IVON's posterior draw, seeded by the optimiser step and sample index only.

    Each process normally draws its own sample (seed + rank), which is the point of IVON's
    all-reduce of the samples and makes a two-process run differ from one process by design.
    With this draw every process perturbs the weights alike, so a two-process step over
    halves of the batch must equal one process over the whole batch.
    """
    import ivon

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1000 * self.current_step + self.state["count"])
        return ivon.IVON._sample_params(self)


def args_for(model_dir, data, out, *extra: str) -> list[str]:
    # No dropout: each rank draws its own dropout masks, so those runs differ by design.
    return [
        "--model", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out),
        "--batch_size", "4", "--micro_batch_size", "1", "--max_steps", "4",
        "--eval_samples_per_subject", "2", "--eval_points", "2", "--checkpoints", "2",
        "--save_state_every", "2", "--lr", "1e-2", "--lora_dropout", "0",
        "--report_to", "none", "--progress", "false", *extra,
    ]  # fmt: skip


def accelerate(config: str, *flags: str) -> list[str]:
    return [
        "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *flags,
        "--main_process_port", str(free_port()),
    ]  # fmt: skip


def torchrun() -> list[str]:
    return ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


def launch(launcher: list[str], script: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Two processes of ``script`` from the repository root (config paths are relative)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", *launcher, str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def train_losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]


def assert_same_training(out: Path, reference: Path) -> None:
    """Same per-step losses (1e-5 relative), evaluations and final adapter as ``reference``."""
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=1e-5)
    eval_losses = [[e["loss"] for e in result(r)["metrics"]["evals"]] for r in (out, reference)]
    assert eval_losses[0] == pytest.approx(eval_losses[1], rel=1e-5)
    got, expected = (load_file(r / "final" / "adapter_model.safetensors") for r in (out, reference))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=2e-6, msg=name)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, mmlu_file, tmp_path_factory) -> Path:
    """The same LoRA run in a single process (plain, unsharded)."""
    out = tmp_path_factory.mktemp("one") / "run"
    finetune.main(args_for(tiny_model_dir, mmlu_file, out))
    return out


# (accelerate config and flags, or None for torchrun; script flags; strategy; fraction of the
# weights and of the optimiser state each rank holds)
CASES = {
    "data-parallel": (["cpu_2proc.yaml"], [], "ddp", 1.0, 1.0),
    "fsdp2-accelerate-config": (
        ["fsdp_full_shard_ac.yaml", "--num_processes", "2", "--mixed_precision", "no"],
        [], "fsdp", 0.5, 0.5,
    ),
    "zero2-accelerate-config": (["zero2.yaml", "--num_processes", "2"], [], "zero2", 1.0, 0.5),
    "zero3-torchrun": (
        None, ["--deepspeed", str(CONFIGS / "deepspeed_zero3.json")], "zero3", 0.5, 0.5,
    ),
}  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_like_one(case, one_process, tiny_model_dir, mmlu_file, tmp_path):
    config, flags, strategy, params, optimizer_state = CASES[case]
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = tmp_path / "two"
    launcher = accelerate(*config) if config else torchrun()
    run = launch(launcher, SCRIPT, args_for(tiny_model_dir, mmlu_file, out, *flags))
    assert run.returncode == 0, run.stderr[-4000:]
    parallel = result(out)["parallel"]
    assert parallel["strategy"] == strategy and parallel["processes"] == 2
    # FSDP: rank 1 built the model on the meta device and got its shards from rank 0
    assert parallel["weights_read_by"] == ("rank 0" if strategy == "fsdp" else "every rank")
    # what each rank stored: the proof that the weights / optimiser state were split
    assert parallel["param_fraction_per_rank"] == pytest.approx([params] * 2, abs=0.02)
    assert parallel["optimizer_state_fraction_per_rank"] == pytest.approx(
        [optimizer_state] * 2, abs=0.02
    )
    # fsdp_full_shard_ac.yaml turns activation checkpointing on: same numbers, less memory
    assert parallel["activation_checkpointing"] == (strategy == "fsdp")
    assert_same_training(out, one_process)


@pytest.mark.multiprocess
def test_killed_fsdp_run_resumes_exactly(tiny_model_dir, mmlu_file, tmp_path):
    """With the L1-to-init penalty: a killed FSDP run resumes to the numbers of the same run
    uninterrupted (θ_init of the resumed run is the original one), and the penalty's value is
    summed over the shards (equal to one process's).

    The whole run is compared with an uninterrupted FSDP run, not with one process: λ·sign(θ −
    θ_init) is discontinuous where θ = θ_init (all of LoRA's B at the start), and Adam's first
    step moves an entry by ±lr whatever its gradient's size, so an entry whose gradient is at
    rounding level can take the other sign under another reduction order."""
    penalty = ["--l1_to_init", "0.1"]
    one_process = tmp_path / "one"
    finetune.main(args_for(tiny_model_dir, mmlu_file, one_process, *penalty))
    uninterrupted = tmp_path / "fsdp-whole"
    args = args_for(tiny_model_dir, mmlu_file, uninterrupted, "--fsdp", "true", *penalty)
    run = launch(accelerate("cpu_2proc.yaml"), SCRIPT, args)
    assert run.returncode == 0, run.stderr[-4000:]
    out = tmp_path / "fsdp"
    args = args_for(tiny_model_dir, mmlu_file, out, "--fsdp", "true", *penalty)
    killed = killed_script(tmp_path, step=4)
    first = launch(accelerate("cpu_2proc.yaml"), killed, args)
    assert first.returncode != 0 and not (out / "result.json").exists()
    state = json.loads((out / "resume" / "trainer_state.json").read_text())
    assert state["step"] == 2
    # each rank wrote its own slices; none holds the whole adapter
    shards = [load_file(out / "resume" / f"shard_rank{r}.safetensors") for r in (0, 1)]
    whole = load_file(one_process / "final" / "adapter_model.safetensors")
    params = [sum(v.numel() for k, v in s.items() if k.startswith("param/")) for s in shards]
    assert params == [sum(v.numel() for v in whole.values()) // 2] * 2

    second = launch(accelerate("cpu_2proc.yaml"), SCRIPT, args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed at step 2" in second.stdout
    assert_same_training(out, uninterrupted)
    penalties = [
        [r["train/l1_to_init"] for r in read_metrics(run) if "train/l1_to_init" in r]
        for run in (out, uninterrupted, one_process)
    ]
    assert len(penalties[0]) == 4 and penalties[0] == pytest.approx(penalties[1], rel=1e-5)
    # after one Adam step every entry is ±lr from θ_init: its sum does not depend on signs
    assert penalties[0][:2] == pytest.approx(penalties[2][:2], rel=1e-5)
    assert not (out / "resume").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_killed_zero_run_resumes_exactly(stage, one_process, tiny_model_dir, mmlu_file, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / f"zero{stage}"
    config = str(CONFIGS / f"deepspeed_zero{stage}.json")
    args = args_for(tiny_model_dir, mmlu_file, out, "--deepspeed", config)
    killed = killed_script(tmp_path, step=4)
    first = launch(torchrun(), killed, args)
    assert first.returncode != 0 and not (out / "result.json").exists()
    state = json.loads((out / "resume" / "trainer_state.json").read_text())
    assert state["step"] == 2
    # each rank wrote its own half of the fp32 master weights (and optimiser state over them)
    shards = [load_file(out / "resume" / f"shard_rank{r}.safetensors") for r in (0, 1)]
    whole = load_file(one_process / "final" / "adapter_model.safetensors")
    fp32 = [sum(v.numel() for k, v in s.items() if k.startswith("fp32/")) for s in shards]
    assert sum(fp32) >= sum(v.numel() for v in whole.values()) and max(fp32) < sum(fp32)

    second = launch(torchrun(), SCRIPT, args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed at step 2" in second.stdout
    assert_same_training(out, one_process)
    assert not (out / "resume").exists()


@pytest.mark.multiprocess
def test_fsdp_shards_a_4bit_qlora_base(mmlu_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = save_tiny_llama(str(tmp_path / "tiny64"), hidden_size=64, intermediate_size=128)
    # no evaluation: bitsandbytes' CPU inference repacks 4-bit weights, which changes the
    # single-process numbers after the first evaluation (FSDP turns that path off)
    flags = ["--method", "qlora", "--max_steps", "3", "--eval_points", "0"]
    flags += ["--eval_at_start", "false"]
    one, two = tmp_path / "one", tmp_path / "two"
    finetune.main(args_for(model, mmlu_file, one, *flags))
    args = args_for(model, mmlu_file, two, *flags, "--fsdp", "true")
    run = launch(accelerate("cpu_2proc.yaml"), SCRIPT, args)
    assert run.returncode == 0, run.stderr[-4000:]
    parallel = result(two)["parallel"]
    # the packed 4-bit weights (stored as float32 here) are sharded like any weight
    assert parallel["param_fraction_per_rank"] == pytest.approx([0.5, 0.5], abs=0.02)
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-5)


def test_deepspeed_auto_entries_come_from_the_run():
    config = read_deepspeed_config(CONFIGS / "deepspeed_zero3.json")
    filled = fill_deepspeed_config(
        config, micro_batch_size=2, accumulation=3, world=2, max_grad_norm=None, bf16=True,
        hidden_size=32,
    )  # fmt: skip
    assert filled["train_batch_size"] == 12 and filled["gradient_accumulation_steps"] == 3
    assert filled["train_micro_batch_size_per_gpu"] == 2 and filled["gradient_clipping"] == 0.0
    assert filled["bf16"] == {"enabled": True} and filled["fp16"] == {"enabled": False}
    zero = filled["zero_optimization"]
    assert zero["reduce_bucket_size"] == 32 * 32
    assert zero["stage3_param_persistence_threshold"] == 10 * 32
    assert config["train_batch_size"] == "auto"  # the file's dict is left as it was
    with pytest.raises(TrainingError, match="sets train_micro_batch_size_per_gpu=8 but"):
        fill_deepspeed_config(
            {**config, "train_micro_batch_size_per_gpu": 8}, micro_batch_size=2, accumulation=3,
            world=2, max_grad_norm=None, bf16=False, hidden_size=32,
        )  # fmt: skip


def test_bad_strategy_requests_fail_in_one_sentence(tmp_path, monkeypatch):
    zero3 = str(CONFIGS / "deepspeed_zero3.json")
    assert requested_strategy(None, zero3).name == "zero3"
    assert requested_strategy(True, None).name == "fsdp"
    assert requested_strategy(None, None).name == "ddp"
    with pytest.raises(TrainingError, match="Both FSDP and DeepSpeed"):
        requested_strategy(True, zero3)
    bad = tmp_path / "ds.json"
    for content, message in [
        ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage=0; use 1, 2 or 3"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {}}, "has an optimizer or scheduler"),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "turns fp16 on"),
    ]:
        bad.write_text(json.dumps(content))
        with pytest.raises(TrainingError, match=message):
            requested_strategy(None, str(bad))
    with pytest.raises(TrainingError, match="does not exist"):
        requested_strategy(None, str(tmp_path / "missing.json"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(TrainingError, match="names no deepspeed_config_file"):
        requested_strategy(None, None)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", zero3)
    assert requested_strategy(None, None).name == "zero3"


def test_strategies_refuse_what_they_cannot_run():
    zero2, zero3 = Strategy("zero2"), Strategy("zero3")
    for strategy in (Strategy("ddp"), Strategy("fsdp")):
        check_strategy(strategy, "ivon", "adalora", from_linearhead=True)
    check_strategy(zero2, "adamw", "lora", from_linearhead=True)
    check_strategy(zero2, "ivon", "lora", from_linearhead=False)  # ZeroIVON: partitioned
    with pytest.raises(TrainingError, match="ivon_opt needs whole, replicated trainable weights"):
        check_strategy(zero2, "ivon_opt", "lora", from_linearhead=False)
    with pytest.raises(TrainingError, match="ivon_mc_samples=2 under zero3: .* one posterior"):
        check_strategy(zero3, "ivon", "lora", from_linearhead=False, ivon_mc_samples=2)
    with pytest.raises(TrainingError, match="optimizer=ivon with method=full under zero2"):
        check_strategy(zero2, "ivon", "full", from_linearhead=False)
    for strategy in (zero2, zero3):  # AdaLoRA trained by IVON (ViLoRA or sensitivity)
        check_strategy(strategy, "ivon", "adalora", from_linearhead=False)
    with pytest.raises(TrainingError, match="adalora needs .* which zero2 partitions"):
        check_strategy(zero2, "adamw", "adalora", from_linearhead=False)
    with pytest.raises(TrainingError, match="adalora needs .* which zero3 partitions; use FSDP"):
        check_strategy(zero3, "sgd", "adalora", from_linearhead=False)
    with pytest.raises(TrainingError, match="from_linearhead .* ZeRO-3"):
        check_strategy(zero3, "sgd", "lora", from_linearhead=True)
    check_strategy(Strategy("fsdp"), "sgd", "full", from_linearhead=False, l1_to_init=0.1)
    with pytest.raises(TrainingError, match=r"l1_to_init .* DeepSpeed \(zero2\)"):
        check_strategy(zero2, "sgd", "full", from_linearhead=False, l1_to_init=0.1)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_is_one_this_script_can_run(path):
    config = yaml.safe_load(path.read_text())
    kind = config["distributed_type"]
    assert kind in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}, kind
    assert config["num_processes"] % config.get("num_machines", 1) == 0
    if kind == "FSDP":
        assert config["fsdp_config"]["fsdp_version"] == 2  # the script shards with FSDP2
    if kind == "DEEPSPEED":  # the JSON it names exists and passes the script's checks
        json_file = config["deepspeed_config"]["deepspeed_config_file"]
        assert read_deepspeed_config(ROOT / json_file)["zero_optimization"]["stage"] in (2, 3)


@pytest.mark.multiprocess
@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp2"])
def test_linear_head_trains_over_two_processes_like_one(fsdp, tiny_model_dir, sst2_dir, tmp_path):
    """No-prompt few-shot LoRA with a logistic-regression head: the head is its own FSDP unit
    (the objective calls it after the model's forward) and is saved beside the adapter."""
    args = [
        "--model", str(tiny_model_dir), "--task", "sst-2", "--task_dir", str(sst2_dir),
        "--shots", "8", "--head", "linear", "--from_linearhead", "true",
        "--optimizer", "sgd", "--lr", "0.1", "--schedule", "constant", "--batch_size", "4",
        "--micro_batch_size", "1", "--max_steps", "3", "--eval_points", "1",
        "--checkpoints", "0", "--lora_dropout", "0", "--report_to", "none",
        "--progress", "false",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    finetune.main([*args, "--output_dir", str(one)])
    flags = ["--output_dir", str(two), *(["--fsdp", "true"] if fsdp else [])]
    run = launch(accelerate("cpu_2proc.yaml"), SCRIPT, [*args, *flags])
    assert run.returncode == 0, run.stderr[-4000:]
    assert result(two)["parallel"]["strategy"] == ("fsdp" if fsdp else "ddp")
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-5)
    assert result(two)["metrics"]["final"]["loss"] == pytest.approx(
        result(one)["metrics"]["final"]["loss"], rel=1e-5
    )
    got, expected = (load_file(r / "final" / "linear_head.safetensors") for r in (two, one))
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=2e-6, msg=name)
    # the per-example test file (written by the main process) is the one process's, in order
    files = [r / result(r)["metrics"]["test_final"]["predictions"] for r in (two, one)]
    records = [[json.loads(line) for line in f.open()] for f in files]
    pairs = [[(r["index"], r["label"]) for r in rs] for rs in records]
    assert pairs[0] == pairs[1] and [i for i, _ in pairs[1]] == list(range(12))
    logits = [torch.tensor([r["logits"] for r in rs], dtype=torch.float64) for rs in records]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


ADALORA = [
    "--method", "adalora", "--adalora_init_r", "4", "--adalora_target_r", "2",
    "--adalora_tinit", "1", "--adalora_tfinal", "1", "--adalora_delta_t", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def adalora_one_process(tiny_model_dir, mmlu_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adalora") / "one"
    finetune.main(args_for(tiny_model_dir, mmlu_file, out, *ADALORA))
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp2"])
def test_adalora_allocates_ranks_over_two_processes_like_one(
    fsdp, adalora_one_process, tiny_model_dir, mmlu_file, tmp_path
):
    """AdaLoRA reads whole gradients to reallocate ranks: under FSDP only the frozen base is
    sharded, the adapter stays whole on each rank with its gradients averaged."""
    out = tmp_path / "two"
    args = args_for(tiny_model_dir, mmlu_file, out, *ADALORA, *(["--fsdp", "true"] * fsdp))
    run = launch(accelerate("cpu_2proc.yaml"), SCRIPT, args)
    assert run.returncode == 0, run.stderr[-4000:]
    parallel = result(out)["parallel"]
    assert parallel["strategy"] == ("fsdp" if fsdp else "ddp")
    assert parallel["trainable_replicated"] is True
    assert parallel["optimizer_state_fraction_per_rank"] == [1.0, 1.0]
    if fsdp:  # the frozen base is halved, the adapter (a few %) is whole
        assert all(0.5 < f < 0.6 for f in parallel["param_fraction_per_rank"])
    assert_same_training(out, adalora_one_process)
    patterns = [
        json.loads((r / "final" / "adapter_config.json").read_text())["rank_pattern"]
        for r in (out, adalora_one_process)
    ]
    assert patterns[0] == patterns[1]
    assert len({sum(keep) for keep in patterns[0].values()}) > 1  # ranks were reallocated


IVON_OPT = ["--optimizer", "ivon_opt", "--lr", "0.2", "--ivon_ess", "1e5", "--schedule", "constant"]


@requires_ivon
@pytest.mark.multiprocess
@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp2-killed-resumed"])
def test_ivon_opt_over_two_processes_is_one_process_with_the_same_draws(
    fsdp, tiny_model_dir, mmlu_file, tmp_path, monkeypatch
):
    """IVON all-reduces its gradient samples (and their products with the noise) at each step;
    with the draws shared across processes (see :func:`shared_ivon_draw`), a step over two
    halves of the batch equals one process over the whole batch. Under FSDP the adapter stays
    whole on each rank, and a killed run resumes to the same numbers."""
    from adaptlab.training.ivon_optim import CheckedIVON

    monkeypatch.setattr(CheckedIVON, "_sample_params", shared_ivon_draw)
    one, two = tmp_path / "one", tmp_path / "two"
    # one posterior draw per step in both runs: no gradient accumulation
    finetune.main(args_for(tiny_model_dir, mmlu_file, one, *IVON_OPT, "--micro_batch_size", "4"))
    flags = [*IVON_OPT, "--micro_batch_size", "2", *(["--fsdp", "true"] * fsdp)]
    args = args_for(tiny_model_dir, mmlu_file, two, *flags)
    if fsdp:
        killed = killed_script(tmp_path, step=4, patch=SHARED_IVON_DRAWS)
        first = launch(accelerate("cpu_2proc.yaml"), killed, args)
        assert first.returncode != 0 and not (two / "result.json").exists()
        # the adapter and IVON's posterior are whole on every rank: one state, no shards
        assert not list((two / "resume").glob("shard_rank*"))
    wrapper = tmp_path / "shared.py"
    wrapper.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n{SHARED_IVON_DRAWS}\n"
        "from tests.conftest import load_script\nload_script('finetune').main(sys.argv[1:])\n"
    )
    run = launch(accelerate("cpu_2proc.yaml"), wrapper, args)
    assert run.returncode == 0, run.stderr[-4000:]
    assert ("resumed at step 2" in run.stdout) == fsdp
    assert result(two)["parallel"]["strategy"] == ("fsdp" if fsdp else "ddp")
    assert_same_training(two, one)


# evaluations average the logits of 2 posterior draws: under ZeRO the draws go through the engine
IVON = ["--optimizer", "ivon", *IVON_OPT[2:], "--ivon_infer_mc_samples", "2"]


# strategy flags, whether the run is killed and resumed, the strategy, the fraction of IVON's
# state on each rank
# (ZeRO-2 with IVON: test_ivon_adalora_over_zero_is_one_process[sensitivity-zero2] and
# tests/test_ivon_zero.py)
IVON_CASES = {
    "data-parallel": ([], False, "ddp", 1.0),
    "fsdp2-killed-resumed": (["--fsdp", "true"], True, "fsdp", 1.0),
    "zero3-killed-resumed": (
        ["--deepspeed", str(CONFIGS / "deepspeed_zero3.json")], True, "zero3", 0.5,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def ivon_one_process(tiny_model_dir, mmlu_file, tmp_path_factory) -> Path:
    """The IVON LoRA run in one process, one micro-batch (one posterior draw) per step."""
    out = tmp_path_factory.mktemp("ivon") / "one"
    finetune.main(args_for(tiny_model_dir, mmlu_file, out, *IVON, "--micro_batch_size", "4"))
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", IVON_CASES)
def test_ivon_over_two_processes_is_one_process_as_it_is(
    case, ivon_one_process, tiny_model_dir, mmlu_file, tmp_path
):
    """adaptlab's IVON seeds its draws by (seed, step, sample), so every process perturbs the
    weights alike without any patch: a step over two halves of the batch equals one process
    over the whole batch. Data parallel and FSDP: IVON all-reduces its averaged samples, the
    adapter and the posterior stay whole on each rank. ZeRO: h and the momentum live in the
    engine's partitions (half on each rank) and the saved Hessian is gathered whole. A killed
    run resumes to the same numbers."""
    flags, killed, strategy, state_fraction = IVON_CASES[case]
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    two = tmp_path / "two"
    args = args_for(tiny_model_dir, mmlu_file, two, *IVON, "--micro_batch_size", "2", *flags)
    if killed:
        first = launch(accelerate("cpu_2proc.yaml"), killed_script(tmp_path, step=4), args)
        assert first.returncode != 0 and not (two / "result.json").exists()
        shards = list((two / "resume").glob("shard_rank*"))
        assert len(shards) == (2 if strategy.startswith("zero") else 0)
    run = launch(accelerate("cpu_2proc.yaml"), SCRIPT, args)
    assert run.returncode == 0, run.stderr[-4000:]
    assert ("resumed at step 2" in run.stdout) == killed
    parallel = result(two)["parallel"]
    assert parallel["strategy"] == strategy
    assert parallel["optimizer_state_fraction_per_rank"] == pytest.approx(
        [state_fraction] * 2, abs=0.02
    )
    assert_same_training(two, ivon_one_process)
    # h as IVON summarised it in the log and as saved for ivon_hessian_from, whole either way
    stats = [
        [r["train/hess_mean"] for r in read_metrics(out) if "train/hess_mean" in r]
        for out in (two, ivon_one_process)
    ]
    assert stats[0] == pytest.approx(stats[1], rel=1e-5)
    got, expected = (load_file(out / "ivon_hessian.safetensors") for out in (two, ivon_one_process))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


# criterion, ZeRO stage
IVON_ADALORA = {"vilora-zero3": ("SNR_mean_abs", 3), "sensitivity-zero2": ("sensitivity", 2)}


@pytest.fixture(scope="module")
def ivon_adalora_one_process(tiny_model_dir, mmlu_file, tmp_path_factory):
    """One-process IVON AdaLoRA runs, by criterion, made when first asked for."""
    runs = {}

    def run(criterion: str) -> Path:
        if criterion not in runs:
            out = tmp_path_factory.mktemp(criterion) / "one"
            flags = [*IVON, *ADALORA, "--vilora_criterion", criterion, "--micro_batch_size", "4"]
            finetune.main(args_for(tiny_model_dir, mmlu_file, out, *flags))
            runs[criterion] = out
        return runs[criterion]

    return run


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", IVON_ADALORA)
def test_ivon_adalora_over_zero_is_one_process(
    case, ivon_adalora_one_process, tiny_model_dir, mmlu_file, tmp_path
):
    """AdaLoRA trained by IVON under ZeRO: ViLoRA's ranks come from the posterior gathered
    whole from the partitions, the sensitivity allocator reads the engine's averaged gradient
    gathered whole, ZeRO-3 keeps the adapter gathered for the penalty and the masks; the run
    (losses, evaluations, adapter, final rank pattern, saved h and h resized to it) equals one
    process. (That the masks reach IVON's partitioned mean is shown in tests/test_ivon_zero.py:
    here the masked entries are too small to move a loss.)"""
    pytest.importorskip("deepspeed")
    criterion, stage = IVON_ADALORA[case]
    one, two = ivon_adalora_one_process(criterion), tmp_path / "two"
    zero = ["--deepspeed", str(CONFIGS / f"deepspeed_zero{stage}.json")]
    flags = [*IVON, *ADALORA, "--vilora_criterion", criterion, "--micro_batch_size", "2", *zero]
    args = args_for(tiny_model_dir, mmlu_file, two, *flags)
    run = launch(accelerate("cpu_2proc.yaml"), SCRIPT, args)
    assert run.returncode == 0, run.stderr[-4000:]
    assert result(two)["parallel"]["strategy"] == f"zero{stage}"
    assert_same_training(two, one)
    patterns = [
        json.loads((r / "final" / "adapter_config.json").read_text())["rank_pattern"]
        for r in (two, one)
    ]
    assert patterns[0] == patterns[1]
    assert len({sum(keep) for keep in patterns[0].values()}) > 1  # ranks were reallocated
    for name in ("ivon_hessian.safetensors", "ivon_hessian_resized.safetensors"):
        got, expected = (load_file(r / name) for r in (two, one))
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


KERNEL_VIEW = {
    "inducer": ["--method", "inducer", "--prefix_length", "3", "--prefix_dim", "4",
                "--inducer_lora_q_r", "2"],
    "kernel_mix": ["--method", "kernel_mix", "--kmix_q_rank", "2", "--kmix_v_rank", "2",
                   "--kmix_q_share_rank", "2", "--kmix_v_share_rank", "2"],
}  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", KERNEL_VIEW)
def test_kernel_view_methods_train_over_fsdp2_like_one_process(
    method, tiny_model_dir, mmlu_file, tmp_path
):
    """The attention adapters live inside the sharded blocks: FSDP2 gathers them with the
    block, and the hooks that read W_O or the projections run on the gathered weights."""
    flags = KERNEL_VIEW[method]
    one = tmp_path / "one"
    finetune.main(args_for(tiny_model_dir, mmlu_file, one, *flags))
    two = tmp_path / "two"
    config = ["fsdp_full_shard_ac.yaml", "--num_processes", "2", "--mixed_precision", "no"]
    run = launch(accelerate(*config), SCRIPT, args_for(tiny_model_dir, mmlu_file, two, *flags))
    assert run.returncode == 0, run.stderr[-4000:]
    assert result(two)["parallel"]["strategy"] == "fsdp"
    assert_same_training(two, one)

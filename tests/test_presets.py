"""Every YAML preset in scripts/configs parses into its script's typed config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adaptlab.config import parse_config
from adaptlab.data import PrepareConfig
from adaptlab.demo import DemoConfig
from adaptlab.extract.config import ExtractConfig
from adaptlab.geometry.study import AnalyzeConfig
from adaptlab.graft.config import GraftConfig
from adaptlab.graft.study import GraftStudyConfig
from adaptlab.ntk.config import KernelConfig
from adaptlab.study import StudyConfig
from adaptlab.training.config import FinetuneConfig
from adaptlab.training.vilora_study import ViLoRAStudyConfig

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"
CONFIG_CLASSES = {
    "analyze": AnalyzeConfig,
    "extract": ExtractConfig,
    "demo": DemoConfig,
    "finetune": FinetuneConfig,
    "graft": GraftConfig,
    "graft_study": GraftStudyConfig,
    "kernel": KernelConfig,
    "prepare": PrepareConfig,
    "study": StudyConfig,
    "vilora_study": ViLoRAStudyConfig,
}


# Fields a preset may leave to the command line (the graft paper preset grafts any run).
COMMAND_LINE = {GraftConfig: {"finetuned": "results/finetune/run"}}


def config_class(path: Path) -> type:
    """The class of the longest prefix of the preset's name (``graft_study_*`` before
    ``graft_*``)."""
    names = [k for k in CONFIG_CLASSES if path.stem == k or path.stem.startswith(f"{k}_")]
    return CONFIG_CLASSES[max(names, key=len)]


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_preset_parses(preset):
    cls = config_class(preset)
    given = yaml.safe_load(preset.read_text())
    extra = [
        arg
        for key, value in COMMAND_LINE.get(cls, {}).items()
        if key not in given
        for arg in (f"--{key}", value)
    ]
    cfg = parse_config(cls, ["--config", str(preset), *extra])
    assert isinstance(cfg, cls)


# The kernel-view presets and the values peft_methods.md §4 gives them (the NLG ones default to
# WebNLG, one of the spec's three tasks; the demos are offline smoke runs of the methods).
NLG = {
    "model": "gpt2",
    "task": "webnlg",
    "source_max_tokens": 400,
    "target_max_tokens": 130,
    "label_smoothing": 0.1,
    "decoding": "top_p",
    "top_p": 0.9,
    "max_new_tokens": 40,
    "optimizer": "adamw",
    "lr": 1.25e-3,
    "schedule": "linear",
    "warmup_steps": 500,
    "min_lr_ratio": 0.0,
    "epochs": 10,
    "seed": 123,
}
NLU = {
    "model": "roberta-base",
    "task": "SST-2",
    "optimizer": "adamw",
    "lr": 2e-4,
    "betas": (0.9, 0.98),
    "eps": 1e-6,
    "weight_decay": 0.1,
    "schedule": "linear",
    "warmup_ratio": 0.06,
    "batch_size": 16,
    "epochs": 10,
    "max_seq_len": 512,
}
DEMO = {"model": "embedded:smollm2-135m", "task": "tweet-sentiment", "max_steps": 8}
KERNEL_MIX = {"kmix_q_rank": 3, "kmix_v_rank": 8, "kmix_q_share_rank": 12, "kmix_v_share_rank": 8}
KERNEL_VIEW_PRESETS = {
    "finetune_nlg_baseline": {**NLG, "method": "full", "lr": 6.25e-5, "batch_size": 8},
    "finetune_nlg_inducer": {
        **NLG,
        "method": "inducer",
        "prefix_length": 10,
        "prefix_dim": 15,
        "inducer_value_extension": True,
        "inducer_lora_q_r": 0,
        "batch_size": 2,
    },
    "finetune_nlg_inducer_lora": {
        **NLG,
        "method": "inducer",
        "prefix_length": 5,
        "prefix_dim": 12,
        "inducer_lora_q_r": 24,
        "inducer_lora_q_alpha": 32.0,
        "lora_dropout": 0.1,
        "batch_size": 2,
    },
    "finetune_nlg_inducer_mam": {
        **NLG,
        "method": "inducer",
        "prefix_length": 3,
        "prefix_dim": 7,
        "inducer_lora_q_r": 16,
        "inducer_lora_q_alpha": 32.0,
        "inducer_parallel_adapter": True,
        "adapter_reduction_factor": 18.2,
        "adapter_layer_norm": True,
        "batch_size": 4,
    },
    "finetune_nlg_kernel_mix": {
        **NLG,
        **KERNEL_MIX,
        "method": "kernel_mix",
        "kmix_alpha": 1.0,
        "lora_dropout": 0.1,
        "batch_size": 4,
    },
    "finetune_nlg_pfeiffer": {
        **NLG,
        "method": "pfeiffer",
        "adapter_location": "attention",
        "adapter_layer_norm": True,
        "batch_size": 4,
    },
    "finetune_nlu_inducer_lora": {
        **NLU,
        "method": "inducer",
        "inducer_lora_q_r": 4,
        "prefix_length": 2,
        "prefix_dim": 4,
        "inducer_value_extension": True,
    },
    "finetune_nlu_kernel_mix": {**NLU, **KERNEL_MIX, "method": "kernel_mix"},
    "finetune_inducer_demo": {**DEMO, "method": "inducer"},
    "finetune_kernel_mix_demo": {**DEMO, **KERNEL_MIX, "method": "kernel_mix"},
    "finetune_prefix_demo": {**DEMO, "method": "prefix"},
}


@pytest.mark.parametrize("name", KERNEL_VIEW_PRESETS)
def test_kernel_view_presets_hold_the_spec_values(name):
    cfg = parse_config(FinetuneConfig, ["--config", str(CONFIGS / f"{name}.yaml")])
    expected = KERNEL_VIEW_PRESETS[name]
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert cfg.micro_batch_size == cfg.batch_size  # no accumulation


def test_graft_demo_grafts_the_demo_run():
    """graft.py's docstring launches finetune_graft_demo.yaml, then graft_demo.yaml."""
    tuned = yaml.safe_load((CONFIGS / "finetune_graft_demo.yaml").read_text())
    grafted = yaml.safe_load((CONFIGS / "graft_demo.yaml").read_text())
    study = yaml.safe_load((CONFIGS / "graft_study_demo.yaml").read_text())
    assert grafted["finetuned"] == tuned["output_dir"]
    # the study's sweep run is that run: finetune/<task> in the study folder
    assert tuned["output_dir"] == f"{study['output_dir']}/finetune/{study['task']}"


def test_every_preset_has_a_config_class():
    assert {config_class(p) for p in CONFIGS.glob("*.yaml")} <= set(CONFIG_CLASSES.values())


def test_unknown_key_and_bad_value_are_rejected(tmp_path, capsys):
    bad = tmp_path / "extract_bad.yaml"
    bad.write_text("num_shot: 3\n")
    with pytest.raises(SystemExit):
        parse_config(ExtractConfig, ["--config", str(bad)])
    assert "num_shot" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(ExtractConfig, ["--num_shots", "7"])
    assert "num_shots=7" in capsys.readouterr().err

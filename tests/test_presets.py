"""Every YAML preset in scripts/configs parses into its script's typed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptlab.config import parse_config
from adaptlab.data import PrepareConfig
from adaptlab.demo import DemoConfig
from adaptlab.extract.config import ExtractConfig
from adaptlab.geometry.study import AnalyzeConfig
from adaptlab.ntk.config import KernelConfig
from adaptlab.training.config import FinetuneConfig

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"
CONFIG_CLASSES = {
    "analyze": AnalyzeConfig,
    "extract": ExtractConfig,
    "demo": DemoConfig,
    "finetune": FinetuneConfig,
    "kernel": KernelConfig,
    "prepare": PrepareConfig,
}


def config_class(path: Path) -> type:
    return CONFIG_CLASSES[path.stem.split("_")[0]]


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_preset_parses(preset):
    cfg = parse_config(config_class(preset), ["--config", str(preset)])
    assert isinstance(cfg, config_class(preset))


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

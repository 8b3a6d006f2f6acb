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
from adaptlab.training.config import FinetuneConfig

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

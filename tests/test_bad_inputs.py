"""Bad input, as a new user types it, across the six recipes: one sentence, nothing written.

Each row of ``CASES`` runs a recipe's ``main`` in this process on a prepared world of tiny
models, MMLU files, finished runs and broken copies of them. Every row must end with a non-zero
exit status and one clear ``error: ...`` line on stderr (at most 3 lines, no traceback) naming
what is wrong, and must leave the output folder exactly as it was. Every row must fail before
any weights are read: loading a model raises a tripwire here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adaptlab.data import nlg_hub
from adaptlab.training import finetune_run
from tests.conftest import ROOT, extract_shot_runs, load_script

SCRIPTS = ("extract_repr", "analyze_repr", "finetune", "compute_kernel", "prepare_fewshot", "demo")


@dataclass(frozen=True)
class Case:
    """One bad input: ``script``'s argv (``{name}`` filled from the world) and the words the
    one-line message must contain (case-insensitive)."""

    id: str
    script: str
    argv: tuple[str, ...]
    says: str


def case(id: str, script: str, argv: str, says: str) -> Case:
    return Case(id, script, tuple(argv.split()), says)


# fmt: off
_EXTRACT = "--model {model} --dataset_path {mmlu} --output_dir {out} --progress false"
_ANALYZE = "--output_dir {out} --progress false"
_FINETUNE = ("--model {model} --dataset_path {mmlu} --output_dir {out} --progress false "
             "--max_steps 2 --batch_size 2 --eval_samples_per_subject 2 --report_to none")
_SST2 = f"{_FINETUNE} --task SST-2 --task_dir {{sst2}} --shots 8"
_KERNEL = ("--model {bert} --task SST-2 --task_dir {sst2} --shots 8 --seeds [42] "
           "--output_dir {out} --progress false")
_PREPARE = "--original_dir {original} --out_dir {out} --tasks [SST-2] --k 4 --seeds [1]"
_DEMO = "--output_dir {out} --samples_per_subject 2 --shots [0]"

CASES = [
    # --- extract_repr: options and values
    case("extract-unknown-option", "extract_repr", f"{_EXTRACT} --num_shot 2",
         "unknown option --num_shot"),
    case("extract-not-an-int", "extract_repr", f"{_EXTRACT} --num_shots abc",
         "--num_shots: expected an integer"),
    case("extract-negative-shots", "extract_repr", f"{_EXTRACT} --num_shots -1", "num_shots"),
    case("extract-zero-batch", "extract_repr", f"{_EXTRACT} --batch_size 0", "batch_size"),
    case("extract-bad-choice", "extract_repr", f"{_EXTRACT} --dtype float64", "one of"),
    case("extract-bad-bool", "extract_repr", f"{_EXTRACT} --overwrite maybe", "true or false"),
    case("extract-unknown-point", "extract_repr", f"{_EXTRACT} --points [nowhere]", "nowhere"),
    case("extract-missing-preset", "extract_repr", f"--config {{tmp}}/none.yaml {_EXTRACT}",
         "none.yaml"),
    case("extract-preset-not-yaml", "extract_repr", f"--config {{bad_yaml}} {_EXTRACT}",
         "not valid yaml"),
    case("extract-preset-unknown-key", "extract_repr", f"--config {{typo_yaml}} {_EXTRACT}",
         "num_shot"),
    # --- extract_repr: models
    case("extract-no-model", "extract_repr", f"{_EXTRACT} --model {{tmp}}/nowhere",
         "neither a local folder"),
    case("extract-model-is-file", "extract_repr", f"{_EXTRACT} --model {{mmlu}}", "is a file"),
    case("extract-model-no-config", "extract_repr", f"{_EXTRACT} --model {{tmp}}",
         "neither config.json"),
    case("extract-corrupt-config", "extract_repr", f"{_EXTRACT} --model {{bad_config}}",
         "config.json"),
    case("extract-truncated-weights", "extract_repr", f"{_EXTRACT} --model {{truncated}}",
         "model.safetensors"),
    case("extract-garbage-weights", "extract_repr", f"{_EXTRACT} --model {{garbage}}",
         "model.safetensors"),
    case("extract-pickle-weights", "extract_repr", f"{_EXTRACT} --model {{pickled}}",
         "pytorch_model.bin"),
    case("extract-adapter-twice", "extract_repr",
         f"{_EXTRACT} --model {{adapter}} --adapter {{adapter}}", "adapter"),
    case("extract-flash-on-cpu", "extract_repr",
         f"{_EXTRACT} --attn_implementation flash_attention_2", "flash"),
    case("extract-4bit-on-cpu", "extract_repr", f"{_EXTRACT} --quantization 4bit", "4-bit"),
    case("extract-hub-unreachable", "extract_repr",
         f"{_EXTRACT} --model nobody-here/no-such-model", "no-such-model"),
    case("extract-unknown-embedded", "extract_repr", f"{_EXTRACT} --model embedded:gpt5",
         "no embedded model"),
    # --- extract_repr: data
    case("extract-no-data", "extract_repr", f"{_EXTRACT} --dataset_path {{tmp}}/none.jsonl",
         "none.jsonl"),
    case("extract-garbage-data", "extract_repr", f"{_EXTRACT} --dataset_path {{bad_yaml}}",
         "bad.yaml"),
    case("extract-dev-of-one-file", "extract_repr", f"{_EXTRACT} --split dev", "dev"),
    case("extract-too-many-per-subject", "extract_repr",
         f"{_EXTRACT} --samples_per_subject 1000", "samples_per_subject"),
    case("extract-unknown-subject", "extract_repr", f"{_EXTRACT} --subjects [cooking]",
         "cooking"),
    case("extract-no-mask", "extract_repr", f"{_EXTRACT} --mask_path {{tmp}}/none.npy",
         "none.npy"),
    case("extract-too-many-shots", "extract_repr", f"{_EXTRACT} --num_shots 50", "shots"),
    # --- extract_repr: output folder
    case("extract-output-is-file", "extract_repr", f"{_EXTRACT} --output_dir {{mmlu}}",
         "is a file"),
    case("extract-output-read-only", "extract_repr", f"{_EXTRACT} --output_dir {{readonly}}/x",
         "not writable"),
    case("extract-other-run-there", "extract_repr",
         f"{_EXTRACT} --output_dir {{run0}} --num_shots 1", "--overwrite"),
    case("extract-overwrite-a-repository", "extract_repr",
         f"{_EXTRACT} --output_dir {{repo}} --overwrite true", "not"),
    case("extract-corrupt-run-record", "extract_repr", f"{_EXTRACT} --output_dir {{bad_parts}}",
         "run.json"),
    # --- analyze_repr
    case("analyze-unknown-option", "analyze_repr", f"{_ANALYZE} --runs [{{run0}}] --pointt x",
         "unknown option --pointt"),
    case("analyze-no-runs", "analyze_repr", f"{_ANALYZE} --runs []", "runs is empty"),
    case("analyze-missing-run", "analyze_repr", f"{_ANALYZE} --runs [{{tmp}}/nowhere]",
         "nowhere"),
    case("analyze-not-a-run", "analyze_repr", f"{_ANALYZE} --runs [{{tmp}}]", "manifest.json"),
    case("analyze-corrupt-manifest", "analyze_repr", f"{_ANALYZE} --runs [{{bad_manifest}}]",
         "manifest.json"),
    case("analyze-missing-statistics", "analyze_repr", f"{_ANALYZE} --runs [{{no_stats}}]",
         "statistics.json"),
    case("analyze-truncated-layer", "analyze_repr", f"{_ANALYZE} --runs [{{bad_layer}}]",
         ".safetensors"),
    case("analyze-escaping-manifest", "analyze_repr", f"{_ANALYZE} --runs [{{escape}}]",
         "outside"),
    case("analyze-missing-checkpoint", "analyze_repr",
         f"{_ANALYZE} --runs [{{run0}}] --checkpoints [{{tmp}}/nowhere]", "nowhere"),
    case("analyze-unknown-point", "analyze_repr", f"{_ANALYZE} --runs [{{run0}}] --point attn",
         "attn"),
    case("analyze-unknown-reference", "analyze_repr",
         f"{_ANALYZE} --runs [{{run0}}] --reference 7shot", "7shot"),
    case("analyze-cuda-on-cpu", "analyze_repr", f"{_ANALYZE} --runs [{{run0}}] --device cuda",
         "cuda"),
    case("analyze-output-is-file", "analyze_repr",
         "--runs [{run0}] --output_dir {mmlu} --progress false", "is a file"),
    case("analyze-bad-metric-value", "analyze_repr",
         f"{_ANALYZE} --runs [{{run0}}] --metrics.maxk abc", "maxk"),
    # --- finetune
    case("finetune-unknown-option", "finetune", f"{_FINETUNE} --learning_rate 1",
         "unknown option --learning_rate"),
    case("finetune-unknown-method", "finetune", f"{_FINETUNE} --method lora2", "lora2"),
    case("finetune-unknown-optimizer", "finetune", f"{_FINETUNE} --optimizer adamax", "adamax"),
    case("finetune-prefix-length-0", "finetune", f"{_FINETUNE} --method prefix --prefix_length 0",
         "prefix_length=0"),
    case("finetune-inducer-negative-length", "finetune",
         f"{_FINETUNE} --method inducer --prefix_length -1", "prefix_length=-1"),
    case("finetune-inducer-dim-0", "finetune", f"{_FINETUNE} --method inducer --prefix_dim 0",
         "prefix_dim=0"),
    case("finetune-value-gating-without-extension", "finetune",
         f"{_FINETUNE} --method inducer --inducer_value_gating true "
         "--inducer_value_extension false", "value extension"),
    case("finetune-kernel-mix-negative-rank", "finetune",
         f"{_FINETUNE} --method kernel_mix --kmix_v_rank -2", "kmix_v_rank=-2"),
    case("finetune-kernel-unknown-variant", "finetune",
         f"{_FINETUNE} --method kernel_adapter --kernel_variant gaussian", "gaussian"),
    case("finetune-kernel-corresponding-gqa", "finetune",
         f"{_FINETUNE} --method kernel_adapter --kernel_corresponding true", "shared_bandwidth"),
    case("finetune-mam-adapter-width-0", "finetune",
         f"{_FINETUNE} --method mam --adapter_reduction_factor 1000", "bottleneck of 0"),
    case("finetune-adapter-location-not-pfeiffer", "finetune",
         f"{_FINETUNE} --method houlsby --adapter_location attention",
         "adapter_location='attention' applies to method=pfeiffer only"),
    case("finetune-unknown-adapter-location", "finetune",
         f"{_FINETUNE} --method pfeiffer --adapter_location mlp", "adapter_location"),
    case("finetune-unknown-schedule", "finetune", f"{_FINETUNE} --schedule wsd", "wsd"),
    case("finetune-negative-lr", "finetune", f"{_FINETUNE} --lr -1", "lr"),
    case("finetune-negative-l1-to-init", "finetune", f"{_FINETUNE} --l1_to_init -1",
         "l1_to_init=-1.0 must be a finite number >= 0"),
    case("finetune-negative-fix-layers", "finetune", f"{_FINETUNE} --fix_layers -2",
         "fix_layers=-2 must be 0 or more"),
    case("finetune-batch-not-divisible", "finetune",
         f"{_FINETUNE} --batch_size 3 --micro_batch_size 2", "micro_batch_size"),
    case("finetune-two-warmups", "finetune", f"{_FINETUNE} --warmup_steps 1 --warmup_ratio 0.1",
         "warmup"),
    case("finetune-run-name-escapes", "finetune", f"{_FINETUNE} --run_name ../..", "run_name"),
    case("finetune-no-model", "finetune", f"{_FINETUNE} --model {{tmp}}/nowhere",
         "neither a local folder"),
    case("finetune-corrupt-config", "finetune", f"{_FINETUNE} --model {{bad_config}}",
         "config.json"),
    case("finetune-truncated-weights", "finetune", f"{_FINETUNE} --model {{truncated}}",
         "model.safetensors"),
    case("finetune-pickle-weights", "finetune", f"{_FINETUNE} --model {{pickled}}",
         "pytorch_model.bin"),
    case("finetune-flash-on-cpu", "finetune",
         f"{_FINETUNE} --attn_implementation flash_attention_2", "flash"),
    case("finetune-hub-unreachable", "finetune", f"{_FINETUNE} --model nobody-here/no-such-model",
         "no-such-model"),
    case("finetune-cnn-dailymail-offline", "finetune", f"{_FINETUNE} --task cnn-dailymail",
         "needs the dataset cnn_dailymail (3.0.0)"),
    case("finetune-webnlg-offline", "finetune", f"{_FINETUNE} --task webnlg",
         "needs the dataset web_nlg (webnlg_challenge_2017)"),
    case("finetune-coqa-offline", "finetune", f"{_FINETUNE} --task coqa",
         "needs the dataset stanfordnlp/coqa"),
    case("finetune-label-smoothing-one", "finetune", f"{_FINETUNE} --label_smoothing 1",
         "label_smoothing=1.0 is outside [0, 1)"),
    case("finetune-label-smoothing-few-shot", "finetune", f"{_SST2} --label_smoothing 0.1",
         "label_smoothing applies to the answer_only loss"),
    case("finetune-no-data", "finetune", f"{_FINETUNE} --dataset_path {{tmp}}/none.jsonl",
         "none.jsonl"),
    case("finetune-dev-of-one-file", "finetune", f"{_FINETUNE} --eval_split dev", "dev"),
    case("finetune-too-many-per-subject", "finetune",
         f"{_FINETUNE} --train_samples_per_subject 1000", "samples_per_subject"),
    case("finetune-unknown-task", "finetune", f"{_FINETUNE} --task SST-3", "SST-3"),
    case("finetune-output-is-file", "finetune", f"{_FINETUNE} --output_dir {{mmlu}}", "is a file"),
    case("finetune-output-read-only", "finetune", f"{_FINETUNE} --output_dir {{readonly}}/x",
         "not writable"),
    case("finetune-missing-resume", "finetune", f"{_FINETUNE} --resume_from {{tmp}}/nowhere",
         "nowhere"),
    case("finetune-multi-token-word", "finetune",
         f'{_SST2} --label_words {{{{"0":"great","1":"greatest"}}}}', "--scoring options"),
    case("finetune-options-masked-lm", "finetune",
         f"{_SST2} --model {{bert}} --scoring options", "causal LM"),
    case("finetune-identical-options", "finetune",
         f'{_SST2} --scoring options --label_words {{{{"0":"good","1":"good"}}}}', "same tokens"),
    case("finetune-options-linear-head", "finetune", f"{_SST2} --scoring options --head linear",
         "head=prompt"),
    case("finetune-options-mmlu", "finetune", f"{_FINETUNE} --scoring options",
         "scoring=label_words"),
    # --- compute_kernel
    case("kernel-unknown-option", "compute_kernel", f"{_KERNEL} --formulas sgd",
         "unknown option --formulas"),
    case("kernel-unknown-formula", "compute_kernel", f"{_KERNEL} --formula adam", "adam"),
    case("kernel-unknown-solver", "compute_kernel", f"{_KERNEL} --solvers [ridge2]", "ridge2"),
    case("kernel-no-task-dir", "compute_kernel", f"{_KERNEL} --task_dir {{tmp}}/nowhere",
         "nowhere"),
    case("kernel-unknown-task", "compute_kernel", f"{_KERNEL} --task SST-3", "SST-3"),
    case("kernel-missing-split", "compute_kernel", f"{_KERNEL} --shots 4", "4-42"),
    case("kernel-no-saved-kernels", "compute_kernel",
         f"{_KERNEL} --load_kernels {{tmp}}/nowhere", "nowhere"),
    case("kernel-template-without-mask", "compute_kernel",
         f"{_KERNEL} --template *cls**sent_0*", "mask"),
    case("kernel-multi-token-label-word", "compute_kernel",
         f'{_KERNEL} --label_words {{{{"0":"xylophone","1":"good"}}}}', "xylophone"),
    case("kernel-truncated-weights", "compute_kernel", f"{_KERNEL} --model {{truncated}}",
         "model.safetensors"),
    case("kernel-output-is-file", "compute_kernel", f"{_KERNEL} --output_dir {{mmlu}}",
         "is a file"),
    # --- prepare_fewshot
    case("prepare-unknown-option", "prepare_fewshot", f"{_PREPARE} --shots 4",
         "unknown option --shots"),
    case("prepare-unknown-task", "prepare_fewshot", f"{_PREPARE} --tasks [SST-3]", "SST-3"),
    case("prepare-no-original", "prepare_fewshot", f"{_PREPARE} --original_dir {{tmp}}/nowhere",
         "nowhere"),
    case("prepare-zero-k", "prepare_fewshot", f"{_PREPARE} --k 0", "k=0"),
    case("prepare-output-is-file", "prepare_fewshot", f"{_PREPARE} --out_dir {{mmlu}}",
         "is a file"),
    case("prepare-bad-mode", "prepare_fewshot", f"{_PREPARE} --mode 2-shot", "one of"),
    # --- demo
    case("demo-unknown-option", "demo", f"{_DEMO} --shot [0]", "unknown option --shot"),
    case("demo-negative-shots", "demo", f"{_DEMO} --shots [-1]", "shots"),
    case("demo-missing-preset", "demo", f"{_DEMO} --extract_preset {{tmp}}/none.yaml",
         "none.yaml"),
    case("demo-output-is-file", "demo", f"{_DEMO} --output_dir {{mmlu}}", "is a file"),
    case("demo-failing-step", "demo", f"{_DEMO} --model {{tmp}}/nowhere", "nowhere"),
]
# fmt: on


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tiny_bert_dir, mmlu_file, sst2_dir) -> dict:
    """Paths the cases name: good inputs and broken copies of them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("world")
    w = {"model": tiny_model_dir, "bert": tiny_bert_dir, "mmlu": mmlu_file, "sst2": sst2_dir}

    def model_copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_model_dir, root / name))

    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    (model_copy("truncated") / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (model_copy("garbage") / "model.safetensors").write_bytes(b"\x07" * 4096)
    (model_copy("bad_config") / "config.json").write_text('{"model_type": "llama", ')
    pickled = model_copy("pickled")
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(),
               pickled / "pytorch_model.bin")  # fmt: skip
    (pickled / "model.safetensors").unlink()
    w.update({n: root / n for n in ("truncated", "garbage", "bad_config", "pickled")})

    adapter = root / "adapter"
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=2, target_modules=["q_proj"]),
    )
    lora.save_pretrained(adapter)
    cfg_path = adapter / "adapter_config.json"
    cfg_path.write_text(
        json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": str(w["model"])})
    )
    w["adapter"] = adapter

    (root / "bad.yaml").write_text("num_shots: [1,\n")
    (root / "typo.yaml").write_text("num_shot: 1\n")
    w["bad_yaml"], w["typo_yaml"] = root / "bad.yaml", root / "typo.yaml"

    runs = extract_shot_runs(tiny_model_dir, mmlu_file, root / "runs", shots=(0,))
    w["run0"] = runs / "0shot"

    def run_copy(name: str) -> Path:
        return Path(shutil.copytree(w["run0"], root / name))

    (run_copy("bad_manifest") / "manifest.json").write_text('{"layers": [')
    (run_copy("no_stats") / "statistics.json").unlink()
    bad_layer = run_copy("bad_layer")
    manifest = json.loads((bad_layer / "manifest.json").read_text())
    layer_file = bad_layer / manifest["layers"][1]["file"]
    layer_file.write_bytes(layer_file.read_bytes()[:100])
    escape = run_copy("escape")
    manifest["layers"][1]["file"] = "../run0/" + manifest["layers"][1]["file"]
    (escape / "manifest.json").write_text(json.dumps(manifest))
    w.update({n: root / n for n in ("bad_manifest", "no_stats", "bad_layer", "escape")})

    bad_parts = root / "bad_parts"
    (bad_parts / ".parts").mkdir(parents=True)
    (bad_parts / ".parts" / "run.json").write_text('{"identity": ')
    w["bad_parts"] = bad_parts

    repo = root / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "README.md").write_text("mine\n")
    w["repo"] = repo

    # a folder nobody can create entries in, root included (CI runs as root, and root passes
    # every permission check of a chmod-ed folder)
    w["readonly"] = Path("/proc")

    original = root / "original" / "SST-2"
    original.mkdir(parents=True)
    (original / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (original / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    w["original"] = root / "original"
    return w


def snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    """Every entry under ``path`` with its size and mtime (``None``: ``path`` is absent)."""
    if not path.exists():
        return None
    if path.is_file():
        return {path.name: (path.stat().st_size, path.stat().st_mtime_ns)}
    return {
        str(p.relative_to(path)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


def tripwire(*args, **kwargs):
    raise AssertionError("weights were read before the bad input was refused")


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_sentence_and_changes_nothing(
    bad: Case, world, tmp_path, capfd, monkeypatch
):
    module = load_script(bad.script)
    names = {**world, "tmp": tmp_path / "scratch", "out": tmp_path / "out"}
    names["tmp"].mkdir()
    argv = [a.format(**names) for a in bad.argv]
    output = Path(argv[argv.index("--output_dir" if "--output_dir" in argv else "--out_dir") + 1])
    before = snapshot(output)
    for reader in (module, finetune_run):  # the recipes that read weights (finetune: its load)
        if hasattr(reader, "load_model"):
            monkeypatch.setattr(reader, "load_model", tripwire)
    # the hub generation tasks see no hub, even where CI has a network (CNN/DailyMail is GBs)
    monkeypatch.setattr(nlg_hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(nlg_hub, "hub_offline", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capfd.readouterr().err  # file-descriptor level: the demo's steps are processes
    assert exit_info.value.code not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and len(lines) <= 3, err
    assert "Traceback" not in err
    assert lines[-1].startswith("error: "), err
    assert bad.says.lower() in err.lower(), err
    assert snapshot(output) == before, "the output folder changed"


def test_the_table_covers_every_recipe_and_is_large():
    counts = {s: sum(c.script == s for c in CASES) for s in SCRIPTS}
    assert min(counts.values()) >= 5 and len(CASES) >= 60, counts
    assert len({c.id for c in CASES}) == len(CASES)


def test_a_real_process_gets_the_same_one_line(tmp_path):
    """The table runs ``main`` in-process; this checks the program as a shell sees it."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "extract_repr.py"), "--num_shot", "2"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: unknown option --num_shot (did you mean --num_shots?); see extract_repr.py --help."
    )
    assert done.stdout == "" and not list(tmp_path.iterdir())

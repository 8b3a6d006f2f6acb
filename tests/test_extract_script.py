"""scripts/extract_repr.py end to end on a tiny model: files, resume, bad input, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adaptlab.extract import runner
from tests.conftest import ROOT, free_port, load_script

extract_repr = load_script("extract_repr")


def args_for(model_dir, data, out, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--dataset_path", str(data), "--output_dir", str(out),
        "--num_shots", "1", "--batch_size", "3", "--chunk_size", "8",
        "--points", "[norm1,block,final_norm,logits]", "--progress", "false", *extra,
    ]  # fmt: skip


def arrays(out) -> dict[str, torch.Tensor]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {e["file"]: load_file(out / e["file"])["repr"] for e in manifest["layers"]}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, mmlu_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    extract_repr.main(args_for(tiny_model_dir, mmlu_file, out))
    return out


def test_outputs_manifest_and_statistics(reference, mmlu_file):
    manifest = json.loads((reference / "manifest.json").read_text())
    stats = json.loads((reference / "statistics.json").read_text())
    n = manifest["n_examples"]
    assert n == 3 * (14 - 5)  # 5 questions per subject are held out as the shot pool
    labels = [(e["point"], e["label"]) for e in manifest["layers"]]
    assert labels == [
        ("norm1", "l0"), ("norm1", "l1"), ("block", "l0"), ("block", "l1"),
        ("final_norm", "l2"), ("logits", "l3"),
    ]  # fmt: skip
    data = arrays(reference)
    assert data["norm1/l0.safetensors"].shape == (n, 32)
    assert data["logits/l3.safetensors"].shape == (n, 508)
    assert not (reference / ".parts").exists()
    # constrained predictions and accuracies recomputed from the stored logits rows
    letters = [manifest["letter_token_ids"][x] for x in "ABCD"]
    constrained = ["ABCD"[i] for i in data["logits/l3.safetensors"][:, letters].argmax(1)]
    assert stats["constrained_predictions"] == constrained
    correct = [p == a for p, a in zip(constrained, stats["answers"], strict=True)]
    assert stats["constrained_accuracy"]["micro"] == pytest.approx(sum(correct) / n)
    per_subject = {}
    for ok, s in zip(correct, stats["subjects"], strict=True):
        per_subject.setdefault(s, []).append(ok)
    macro = sum(sum(v) / len(v) for v in per_subject.values()) / len(per_subject)
    assert stats["constrained_accuracy"]["macro"] == pytest.approx(macro)
    assert manifest["timings"]["examples_per_rank"] == [n]
    assert manifest["timings"]["model_dtype"] == "float32"  # fp32 on CPU
    assert manifest["timings"]["attn_implementation"] == "sdpa"


def test_rerun_with_same_arguments_is_a_no_op(reference, tiny_model_dir, mmlu_file, capsys):
    before = (reference / "manifest.json").read_text()
    extract_repr.main(args_for(tiny_model_dir, mmlu_file, reference))
    assert "nothing to do" in capsys.readouterr().out
    assert (reference / "manifest.json").read_text() == before


def test_killed_run_resumes_to_the_same_arrays(
    reference, tiny_model_dir, mmlu_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    real_write = runner._write_chunk
    written = []

    def write_then_die(path, gathered):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill after two chunks")
        real_write(path, gathered)
        written.append(path)

    monkeypatch.setattr(runner, "_write_chunk", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract_repr.main(args_for(tiny_model_dir, mmlu_file, out))
    assert not (out / "manifest.json").exists()
    assert len(list((out / ".parts").glob("chunk_*.safetensors"))) == 2
    monkeypatch.setattr(runner, "_write_chunk", real_write)
    extract_repr.main(args_for(tiny_model_dir, mmlu_file, out))
    timings = json.loads((out / "manifest.json").read_text())["timings"]
    assert (timings["chunks_skipped"], timings["chunks_done"]) == (2, 2)
    expected, got = arrays(reference), arrays(out)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "embedded:nope"], "embedded"),
        (["--model", "./no/such/folder"], "neither a local folder"),
        (["--dataset_path", "missing.jsonl"], "missing.jsonl"),
        (["--num_shots", "5", "--dataset_path", "FEW_SHOTS"], "shot"),
        (["--max_seq_len", "3"], "max_seq_len=3"),
        (["--subjects", "[astrology]"], "astrology"),
        (["--dataset_path", "MALFORMED"], "malformed.jsonl"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    extra, message, tiny_model_dir, mmlu_file, tmp_path, capsys
):
    few = tmp_path / "few.jsonl"  # one subject with 4 questions: at most 3 can be shots
    few.write_text("".join(line + "\n" for line in mmlu_file.read_text().splitlines()[:4]))
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"question": "What?", "answer_a": "x"}\n')
    files = {"FEW_SHOTS": str(few), "MALFORMED": str(malformed)}
    extra = [files.get(x, x) for x in extra]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        extract_repr.main(args_for(tiny_model_dir, mmlu_file, out) + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_unknown_point_is_rejected_by_the_parser(tiny_model_dir, mmlu_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        extract_repr.main(args_for(tiny_model_dir, mmlu_file, tmp_path / "o", "--points", "[res2]"))
    assert "res2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_output_dir_of_a_different_run_is_refused(reference, tiny_model_dir, mmlu_file, capsys):
    with pytest.raises(SystemExit):
        extract_repr.main(args_for(tiny_model_dir, mmlu_file, reference, "--num_shots", "2"))
    assert "different run" in capsys.readouterr().err


# Python imports ``sitecustomize`` at start-up, so this file, first on PYTHONPATH, runs in every
# process of a launch: each rank appends the safetensors files it opens to reads_rank{RANK}.txt.
# It watches the library call that reads weights, from outside the code under test.
READS_PROBE = """
import os

import safetensors

_safe_open = safetensors.safe_open


def safe_open(filename, *args, **kwargs):
    if "RANK" in os.environ:
        log = os.path.join(os.environ["READS_DIR"], f"reads_rank{os.environ['RANK']}.txt")
        with open(log, "a") as handle:
            handle.write(os.path.realpath(filename) + "\\n")
    return _safe_open(filename, *args, **kwargs)


safetensors.safe_open = safe_open
"""

# accelerate config and flags: data parallel, and the FSDP config the 70B example uses
LAUNCHES = {
    "data-parallel": ["cpu_2proc.yaml"],
    "fsdp2": ["fsdp.yaml", "--num_processes", "2", "--mixed_precision", "no"],
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("launch", LAUNCHES)
def test_two_processes_equal_one(reference, tiny_model_dir, mmlu_file, tmp_path, launch):
    fsdp = launch == "fsdp2"
    out, probe = tmp_path / "two", tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(READS_PROBE)
    config, *flags = LAUNCHES[launch]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / config), *flags,
        "--main_process_port", str(free_port()),
        str(ROOT / "scripts" / "extract_repr.py"),
        *args_for(tiny_model_dir, mmlu_file, out),
    ]  # fmt: skip
    path = os.pathsep.join([str(probe), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "READS_DIR": str(probe)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    timings = json.loads((out / "manifest.json").read_text())["timings"]
    n = json.loads((out / "manifest.json").read_text())["n_examples"]
    # both ranks really ran: each did part of the examples, together all of them once
    assert timings["world_size"] == 2
    assert timings["fsdp"] == fsdp
    assert all(k > 0 for k in timings["examples_per_rank"])
    assert sum(timings["examples_per_rank"]) == n
    fractions = timings["param_fraction_per_rank"]
    if fsdp:  # each rank stores about half of the weights
        assert all(0.4 < f < 0.6 for f in fractions), fractions
    else:
        assert fractions == [1.0, 1.0]
    # FSDP: rank 1 never opened the checkpoint (it got its shards from rank 0); data parallel:
    # both did, which shows that the probe sees rank 1's reads
    weights = str((tiny_model_dir / "model.safetensors").resolve())
    reads = [
        (probe / f"reads_rank{r}.txt").read_text().split()
        if (probe / f"reads_rank{r}.txt").exists()
        else []
        for r in (0, 1)
    ]
    assert weights in reads[0]
    assert (weights in reads[1]) == (not fsdp), reads
    assert timings["weights_read_by"] == ("rank 0" if fsdp else "every rank")
    expected, got = arrays(reference), arrays(out)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
    stats_1 = json.loads((reference / "statistics.json").read_text())
    stats_2 = json.loads((out / "statistics.json").read_text())
    assert stats_1["rows"] == stats_2["rows"]


def test_extraction_from_a_peft_adapter_equals_the_merged_model(
    reference, tiny_model_dir, mmlu_file, tmp_path
):
    from peft import LoraConfig, get_peft_model

    from adaptlab.models import load_model, load_tokenizer

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(load_model(tiny_model_dir), lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "merged")
    extract_repr.main(args_for(tmp_path / "adapter", mmlu_file, tmp_path / "a"))
    extract_repr.main(args_for(tmp_path / "merged", mmlu_file, tmp_path / "m"))
    got, expected = arrays(tmp_path / "a"), arrays(tmp_path / "m")
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
    # the adapter really changed the representations (the base model's differ)
    assert not torch.allclose(
        got["norm1/l1.safetensors"], arrays(reference)["norm1/l1.safetensors"]
    )


def test_encoder_without_lm_head_extracts_block_outputs(mmlu_file, tmp_path, capsys):
    from transformers import BertModel

    from adaptlab.models.tiny import tiny_bert, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    encoder = BertModel(tiny_bert(vocab_size=len(tokenizer)).config).eval()
    encoder.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    out = tmp_path / "enc"
    base = args_for(tmp_path / "bert", mmlu_file, out)
    with pytest.raises(SystemExit):  # default points include final_norm/logits: a clear error
        extract_repr.main(base)
    assert "block" in capsys.readouterr().err.splitlines()[-1]
    extract_repr.main(base + ["--points", "[block]", "--token", "mean", "--num_shots", "0"])
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["predictions"] is None and stats["accuracy"] is None
    rows = arrays(out)["block/l1.safetensors"]
    from adaptlab.data import load_mmlu, tokenize_prompts

    splits = load_mmlu(mmlu_file)
    first = tokenize_prompts(splits.test[:1], splits.dev, tokenizer, 0, 42, None)[0]
    with torch.no_grad():
        hidden = encoder(torch.tensor([first.input_ids]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(rows[0], hidden[2][0].mean(0), atol=1e-5, rtol=1e-4)


def test_shot_selection_controls_change_the_shots_not_the_questions(
    tiny_model_dir, mmlu_file, tmp_path
):
    """The random and other-subject controls evaluate the same questions as fixed shots, with
    the shots the rule picks, and the manifest states how much prompt text queries share."""
    from adaptlab.data import load_mmlu, tokenize_prompts

    manifests, rows = {}, {}
    for rule in ("fixed", "random", "other_subject"):
        out = tmp_path / rule
        extract_repr.main(args_for(tiny_model_dir, mmlu_file, out, "--num_shots", "3",
                                   "--shot_pool_size", "6", "--shot_selection", rule,
                                   "--points", "[final_norm]"))  # fmt: skip
        manifests[rule] = json.loads((out / "manifest.json").read_text())
        rows[rule] = load_file(out / manifests[rule]["layers"][0]["file"])["repr"]
    splits = load_mmlu(mmlu_file, holdout_per_subject=6)
    assert {m["n_examples"] for m in manifests.values()} == {len(splits.test)}
    shared = {rule: m["prompt"]["shared_text_fraction"] for rule, m in manifests.items()}
    assert shared["fixed"] > shared["random"] > shared["other_subject"] > 0
    assert {m["prompt"]["shot_selection"] for m in manifests.values()} == set(manifests)
    # the rows are the representations of the prompts the rule builds (checked for random)
    from transformers import AutoTokenizer

    from adaptlab.models import load_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = tokenize_prompts(splits.test, splits.dev, tok, 3, 42, None, selection="random")
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        last = model(torch.tensor([prompts[0].input_ids]), output_hidden_states=True)
    torch.testing.assert_close(rows["random"][0], last.hidden_states[-1][0, -1])
    assert not torch.allclose(rows["random"][0], rows["fixed"][0])

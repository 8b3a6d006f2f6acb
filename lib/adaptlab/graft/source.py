"""Where θ_ft comes from: a fine-tuning run, a plain model folder or a PEFT adapter.

:func:`resolve_finetuned` reads what a ``--finetuned`` folder is without loading weights:

* a ``scripts/finetune.py`` run folder (``run.json`` / ``result.json``): its ``best/`` weights
  (``final/`` without one), its base model and its data config and freezing flags;
* a checkpoint folder inside such a run (``best/``, ``checkpoints/step_100``...): those weights,
  with the run's config;
* a plain Hugging Face model folder (``config.json``): no run config, so the data and the
  eligible set come from the graft config;
* a PEFT adapter folder (``adapter_config.json``): Δ is the adapter's merged delta on the
  weights it wraps.

:func:`data_config` and :func:`selection_of` read the run's data settings and freezing flags,
so grafting sees the data and the eligible set the fine-tuning run had.

:func:`safetensors_files` lists a model folder's weights, which the recipe reads lazily (only
the eligible entries, under FSDP only each process's rows); :func:`adapter_tensors` merges an
adapter one layer at a time into a copy of that layer's weight (θ_ft never exists as a second
whole model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from adaptlab.adapters.folder import LEGACY_CONFIG, is_adaptlab_folder
from adaptlab.data import get_task, split_tasks
from adaptlab.graft.config import GraftConfig
from adaptlab.graft.eligible import Selection, eligible_names
from adaptlab.graft.errors import GraftError
from adaptlab.graft.sharded import safetensors_rows

RUN_FILES = ("result.json", "run.json")
CHECKPOINT_META = "adaptlab_checkpoint.json"


@dataclass(frozen=True)
class FinetunedSource:
    """A resolved ``--finetuned`` folder.

    Attributes:
        path: the folder given.
        weights: the folder holding the weights (``config.json`` or ``adapter_config.json``).
        kind: ``model`` (full weights) or ``adapter`` (PEFT).
        run_config: the fine-tuning run's config (None for a plain folder).
        base_model: the base the run or adapter names (None when unknown).
    """

    path: Path
    weights: Path
    kind: Literal["model", "adapter"]
    run_config: dict[str, Any] | None
    base_model: str | None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GraftError(f"{path} is not readable JSON ({error}); is the run complete?") from None
    if not isinstance(data, dict):
        raise GraftError(f"{path} is not a JSON object; is the run folder intact?")
    return data


def _run_config(folder: Path) -> dict[str, Any] | None:
    for name in RUN_FILES:
        if (folder / name).is_file():
            config = _read(folder / name).get("config")
            if isinstance(config, dict):
                return config
    return None


def resolve_finetuned(path: str | Path) -> FinetunedSource:
    """What ``--finetuned`` names (see the module docstring).

    Raises:
        GraftError: a missing folder, or one that holds neither a run nor weights.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise GraftError(
            f"--finetuned {path} is not a folder; pass a scripts/finetune.py output folder, a "
            "model folder or a PEFT adapter folder."
        )
    run_config = _run_config(folder)
    weights = folder
    if run_config is not None:
        for name in ("best", "final"):
            if (folder / name).is_dir():
                weights = folder / name
                break
        else:
            raise GraftError(
                f"The fine-tuning run {folder} has neither best/ nor final/ weights; let it "
                "finish (run its command again to resume), or pass a checkpoint folder."
            )
    elif (folder / CHECKPOINT_META).is_file():
        run_config = _run_config(folder.parent) or _run_config(folder.parent.parent)
    if is_adaptlab_folder(weights) or (weights / LEGACY_CONFIG).is_file():
        raise GraftError(
            f"{weights} holds adaptlab adapters (e.g. bottleneck), which add modules instead of "
            "changing the pretrained weights, so there is no delta to graft; use a full, BitFit "
            "or LoRA run."
        )
    if (weights / "adapter_config.json").is_file():
        kind: Literal["model", "adapter"] = "adapter"
        base = _read(weights / "adapter_config.json").get("base_model_name_or_path")
    elif (weights / "config.json").is_file():
        kind, base = "model", None
    else:
        raise GraftError(
            f"{weights} holds neither config.json nor adapter_config.json; pass the folder a "
            "fine-tuned model or adapter was saved to."
        )
    if run_config is not None:
        if run_config.get("head", "prompt") != "prompt":
            raise GraftError(
                f"{folder} was fine-tuned with head={run_config.get('head')!r}; grafting scores "
                "label words, so graft a head=prompt run."
            )
        if run_config.get("task", "mmlu") == "mmlu":
            raise GraftError(
                f"{folder} was fine-tuned on answer-only MMLU; grafting evaluates a few-shot "
                "classification task: graft a run of one (e.g. --task mmlu-topics)."
            )
        base = base or run_config.get("model")
    return FinetunedSource(folder, weights, kind, run_config, str(base) if base else None)


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (safetensors only; a clear error without them)."""
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name not in ("adapter_model.safetensors",)]
    if not files:
        raise GraftError(
            f"{folder} has no .safetensors weights; grafting reads safetensors only (re-save the "
            "model with save_pretrained)."
        )
    return files


@torch.no_grad()
def adapter_tensors(model: nn.Module, adapter: Path) -> dict[str, Tensor]:
    """θ_ft of every weight a PEFT adapter changes, merged one layer at a time.

    The adapter is injected into ``model`` (θ_pre), each adapted layer is merged, its weight
    copied, and the saved θ_pre value put back exactly; then the adapter is removed, so
    ``model`` is θ_pre again. ``modules_to_save`` copies count as changed weights too.

    Returns:
        name (as in ``model``) -> θ_ft tensor on the model's device.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    prefix = "base_model.model."
    out: dict[str, Tensor] = {}
    for name, module in peft_model.named_modules():
        short = name[len(prefix) :] if name.startswith(prefix) else name
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            saved = {n: p.detach().clone() for n, p in base.named_parameters(recurse=False)}
            module.merge()
            for n, p in base.named_parameters(recurse=False):
                if not torch.equal(p, saved[n]):
                    out[f"{short}.{n}"] = p.detach().clone()
                p.data.copy_(saved[n])
            module.merged_adapters.clear()
        elif isinstance(module, ModulesToSaveWrapper):
            active = module.active_adapter
            active = active[0] if isinstance(active, list | tuple) else active
            for n, p in module.modules_to_save[active].named_parameters():
                out[f"{short}.{n}"] = p.detach().clone()
    peft_model.unload()
    if not out:
        raise GraftError(f"The adapter in {adapter} changes no weight; nothing to graft.")
    return out


DATA_FIELDS = {  # graft config field -> fine-tuning run field
    "task": "task",
    "task_dir": "task_dir",
    "shots": "shots",
    "seed": "data_seed",
    "kshot_mode": "kshot_mode",
    "template": "template",
    "label_words": "label_words",
    "test_limit": "test_limit",
    "scoring": "scoring",
}
DATA_DEFAULTS = {"shots": 16, "seed": 42, "kshot_mode": "k-shot", "scoring": "label_words"}


def data_config(cfg: GraftConfig, run: dict | None, mask: dict | None) -> dict[str, Any]:
    """The data fields: the config's, else the fine-tuning run's, else the mask's, else defaults."""
    recorded = (mask or {}).get("data", {})
    out = {}
    for ours, theirs in DATA_FIELDS.items():
        value = getattr(cfg, ours)
        if value is None and run is not None:
            value = run.get(theirs)
        if value is None:
            value = recorded.get(ours, DATA_DEFAULTS.get(ours))
        out[ours] = value
    if out["task"] is None:
        raise GraftError("No task is known: pass --task (and --task_dir), or graft a run folder.")
    trained = split_tasks(run["task"]) if run is not None and run.get("task") else []
    if len(trained) > 1 and cfg.task is None:
        raise GraftError(
            f"The run was fine-tuned on several tasks ({', '.join(trained)}); a graft is learned "
            "per task: pass --task with one of them."
        )
    out["task"] = get_task(out["task"]).name
    if len(trained) > 1 and out["task"] not in trained:
        raise GraftError(
            f"--task {out['task']} is not one of the tasks the run trained ({', '.join(trained)})."
        )
    return out


def selection_of(cfg: GraftConfig, source: FinetunedSource | None) -> Selection | None:
    """The eligible-set flags: the run's own, or the config's for a plain model folder."""
    overrides = {
        "fix_head": cfg.fix_head,
        "fix_embeddings": cfg.fix_embeddings,
        "fix_layers": cfg.fix_layers,
        "biases_only": cfg.biases_only,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if source is not None and source.kind == "adapter":
        if given:
            raise GraftError(
                f"{', '.join(given)} do not apply to an adapter: its eligible set is the weights "
                "it changes; drop them."
            )
        return None
    if source is not None and source.run_config is not None:
        if given:
            raise GraftError(
                f"{', '.join(given)} override the fine-tuning run's own freezing flags, which "
                "define the eligible set; drop them to graft what the run trained."
            )
        return Selection.from_run_config(source.run_config)
    run = {k: v for k, v in given.items() if k != "biases_only"}
    return Selection.from_run_config({**run, "method": "bitfit" if cfg.biases_only else "full"})


def finetuned_tensors(
    source: FinetunedSource | None, selection: Selection | None, model: nn.Module, saved: Any
) -> tuple[list[str], Any]:
    """The eligible names and θ_ft: whole tensors (adapter, mask) or a safetensors row reader
    (a model folder: each process reads only its rows, and only of eligible tensors).

    Args:
        source: the resolved ``--finetuned`` (None: evaluate ``saved`` alone).
        selection: the run's freezing flags (model folders).
        model: θ_pre, not sharded yet.
        saved: the mask being evaluated (:class:`~adaptlab.graft.artefact.GraftMask`) or None;
            without a source θ_ft is known at its positions only.
    """
    params = dict(model.named_parameters())
    if source is None:  # eval_only from the mask alone: θ_ft is known at the mask only
        finetuned = {n: params[n].detach().clone() for n in saved.names}
        for n, t in finetuned.items():
            flat, idx = t.view(-1), saved.index[n].to(t.device)
            flat[idx] = (flat[idx].double() + saved.delta[n].to(t.device)).to(t.dtype)
        return saved.names, finetuned
    if source.kind == "adapter":
        finetuned = adapter_tensors(model, source.weights)
        return [n for n in params if n in finetuned], finetuned
    return eligible_names(model, selection), safetensors_rows(safetensors_files(source.weights))

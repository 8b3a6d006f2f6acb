"""Skill localization by grafting (Panigrahi et al. 2023; graft.md).

A sparse mask γ over the parameters a fine-tuning run trained grafts θ_ft onto θ_pre:
θ(γ) = θ_pre + γ ⊙ Δ. One module per concern:

| module      | what                                                                   |
|-------------|------------------------------------------------------------------------|
| eligible    | the eligible set E (the fine-tuning run's selector), N_E                |
| tensors     | θ_pre, θ_ft, b, S per eligible tensor; θ(γ) for fractional/binary γ     |
| patch       | the base patch: exactly k = ⌊s·N_E⌋ largest |Δ|, loaded, or empty       |
| mask        | γ = b + (1 − 2b)σ(S − β), γ_bin, the §5 update of S                     |
| learn       | the mask-learning loop, best train + dev mask                          |
| artefact    | the mask folder (config + safetensors), content hashes                 |
| tuner       | apply / merge / unmerge a saved mask, export the grafted model          |
| analysis    | graft sizes, recovery, the asymmetric overlap of task masks            |
| sharded     | the same under FSDP2: per-shard tensors, exact global top-k, gathering |
| source      | where θ_ft comes from: a fine-tuning run, a model or adapter folder    |
| config      | the typed config of ``scripts/graft.py``                               |
"""

from adaptlab.graft.artefact import CONFIG_FILE, MASK_FILE, GraftMask, is_mask_folder, load_mask
from adaptlab.graft.eligible import Selection, eligible_names
from adaptlab.graft.errors import GraftError
from adaptlab.graft.learn import MaskHistory, MaskSettings, learn_mask, mask_step
from adaptlab.graft.patch import patch_size, top_delta_patch
from adaptlab.graft.tensors import GraftTensors, collect
from adaptlab.graft.tuner import Graft, apply_graft, export_model, merge_graft

__all__ = [
    "CONFIG_FILE",
    "MASK_FILE",
    "Graft",
    "GraftError",
    "GraftMask",
    "GraftTensors",
    "MaskHistory",
    "MaskSettings",
    "Selection",
    "apply_graft",
    "collect",
    "eligible_names",
    "export_model",
    "is_mask_folder",
    "learn_mask",
    "load_mask",
    "mask_step",
    "merge_graft",
    "patch_size",
    "top_delta_patch",
]

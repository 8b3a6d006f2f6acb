"""Run records: package versions, hardware and timings, for manifests and result JSON."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from importlib import metadata

import torch

_PACKAGES = (
    "adaptlab", "torch", "transformers", "accelerate", "peft", "safetensors", "numpy",
    "datasets", "dadapy", "scikit-learn", "bitsandbytes", "deepspeed", "flash-attn", "gguf",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    """Installed version of each package adaptlab results depend on (None when absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, object]:
    """CPU count, GPU names and memory, as seen by this process."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak allocated accelerator memory in MiB, or peak RSS of this process on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        return None


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

"""Model names: what a string names (embedded, local folder, adapter, graft mask, hub id),
resolved without loading any weights (see :mod:`adaptlab.models.loader` for the rules)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from adaptlab.adapters.folder import refuse_legacy
from adaptlab.models.embedded import EMBEDDED_MODELS, EMBEDDED_PREFIX, embedded_model_dir
from adaptlab.models.errors import ModelFileError, ModelNotFoundError
from adaptlab.network import hub_reachable

Source = Literal["embedded", "local", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUTHY = {"1", "ON", "YES", "TRUE"}
_MAX_ADAPTER_DEPTH = 8
GRAFT_CONFIG = "graft_config.json"  # a graft mask folder (adaptlab.graft.artefact)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model name: what to pass to ``from_pretrained``, and where it came from.

    Attributes:
        name: the name or path exactly as given.
        path: what ``from_pretrained`` takes: an absolute folder (embedded, local) or a hub id.
            For an adapter ref this is the adapter folder (or hub id), and :attr:`base` says
            which model it sits on. ``None`` for an embedded model resolved with
            ``materialize=False``.
        source: ``"embedded"``, ``"local"`` or ``"hub"``.
        adapter_path: the PEFT adapter folder (or hub id) when the name is an adapter, else
            ``None``.
        base: the resolved base model of an adapter or graft (itself possibly an adapter),
            else ``None``.
        graft_path: the graft mask folder (``graft_config.json``, ``scripts/graft.py``'s
            ``mask/``) when the name is one: its recorded base model loads and the graft is
            merged into it.
    """

    name: str
    path: str | None
    source: Source
    adapter_path: str | None = None
    base: ModelRef | None = None
    graft_path: str | None = None

    @property
    def is_adapter(self) -> bool:
        """Whether this ref is a PEFT adapter on top of :attr:`base`."""
        return self.adapter_path is not None

    @property
    def root(self) -> ModelRef:
        """The full model at the bottom of an adapter chain (``self`` when not an adapter)."""
        ref = self
        while ref.base is not None:
            ref = ref.base
        return ref

    @property
    def adapters(self) -> list[str]:
        """Adapter paths from the one nearest the base model to this one (empty if none)."""
        chain: list[str] = []
        ref: ModelRef | None = self.base if self.graft_path else self
        while ref is not None and ref.adapter_path is not None:
            chain.append(ref.adapter_path)
            ref = ref.base
        return chain[::-1]


def resolve_model(name_or_path: str | os.PathLike[str], *, materialize: bool = True) -> ModelRef:
    """Say what a model name refers to, without loading any weights.

    Order of precedence: an ``embedded:`` name, then an existing local path, then a hub id.

    Args:
        name_or_path: ``embedded:<name>``, a local model or adapter folder, or a hub id.
        materialize: for embedded models, fetch (and on first use convert) the model so that
            :attr:`ModelRef.path` is set. ``False`` only validates the name, which is instant.

    Returns:
        The resolved reference.

    Raises:
        ModelNotFoundError: unknown embedded name, a local folder that holds no model, a string
            that is neither a path nor a hub id, or a hub id that is not cached while the hub
            is offline.
    """
    return _resolve(os.fspath(name_or_path), materialize, ())


def _resolve(name: str, materialize: bool, seen: tuple[str, ...]) -> ModelRef:
    if not name.strip():
        raise ModelNotFoundError(
            "An empty model name was given; pass a folder holding config.json, or "
            "embedded:smollm2-135m."
        )
    if name.startswith(EMBEDDED_PREFIX):
        short = name[len(EMBEDDED_PREFIX) :]
        if short not in EMBEDDED_MODELS:
            valid = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
            raise ModelNotFoundError(
                f"There is no embedded model {short!r}; valid names are {valid}."
            )
        path = None
        if materialize:
            path = str(embedded_model_dir(short))
        return ModelRef(name=name, path=path, source="embedded")

    local = Path(name).expanduser()
    if local.exists():
        return _resolve_local(name, local.resolve(), materialize, seen)
    if not _is_hub_id(name):
        raise ModelNotFoundError(
            f"{name!r} is neither a local folder nor a model name on the hub; pass a folder "
            "holding config.json, or embedded:smollm2-135m."
        )
    return _resolve_hub(name, materialize, seen)


def _resolve_local(name: str, folder: Path, materialize: bool, seen: tuple[str, ...]) -> ModelRef:
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"{name!r} is a file, not a model folder; pass the folder holding its config.json "
            "(or adapter_config.json)."
        )
    if (folder / GRAFT_CONFIG).is_file():
        base = _resolve_graft_base(name, folder / GRAFT_CONFIG, materialize, seen)
        return ModelRef(name=name, path=str(folder), source="local", base=base,
                        graft_path=str(folder))  # fmt: skip
    refuse_legacy(folder)  # whole model + bottleneck files: would load without its adapters
    if (folder / "adapter_config.json").is_file():
        base = _resolve_adapter_base(name, folder / "adapter_config.json", materialize, seen)
        path = str(folder)
        return ModelRef(name=name, path=path, source="local", adapter_path=path, base=base)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"Folder {name!r} holds neither config.json nor adapter_config.json; pass the folder "
            "a model or adapter was written to by save_pretrained."
        )
    _check_config(folder / "config.json")
    return ModelRef(name=name, path=str(folder), source="local")


def _check_config(path: Path) -> None:
    """Refuse a ``config.json`` that is not a JSON object (truncated, garbage, hand-edited)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(
            f"{path} is not a readable JSON file ({error}); it is damaged: restore it or save "
            "the model again with save_pretrained."
        ) from error
    if not isinstance(config, dict):
        raise ModelFileError(
            f"{path} holds a JSON {type(config).__name__}, not the object save_pretrained "
            "writes; restore it or save the model again."
        )


def _resolve_hub(name: str, materialize: bool, seen: tuple[str, ...]) -> ModelRef:
    cached_config = _hub_cached_file(name, "config.json")
    cached_adapter = _hub_cached_file(name, "adapter_config.json")
    if cached_config is None and cached_adapter is not None:
        base = _resolve_adapter_base(name, Path(cached_adapter), materialize, seen)
        return ModelRef(name=name, path=name, source="hub", adapter_path=name, base=base)
    if cached_config is None and _hub_offline():
        raise ModelNotFoundError(
            f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
            f"downloading it; run `hf download {name}` where the hub is reachable, or pass a "
            "local folder or embedded:smollm2-135m."
        )
    if cached_config is None and not hub_reachable():
        raise ModelNotFoundError(
            f"{name!r} is not in the local Hugging Face cache and the hub cannot be reached from "
            f"this machine; run `hf download {name}` where it can, or pass a local folder or "
            "embedded:smollm2-135m."
        )
    return ModelRef(name=name, path=name, source="hub")


def _resolve_adapter_base(
    name: str, adapter_config: Path, materialize: bool, seen: tuple[str, ...]
) -> ModelRef:
    key = str(adapter_config)
    if key in seen or len(seen) >= _MAX_ADAPTER_DEPTH:
        raise ModelNotFoundError(
            f"The adapter chain starting at {name!r} loops or is deeper than "
            f"{_MAX_ADAPTER_DEPTH}; fix base_model_name_or_path in its adapter_config.json."
        )
    try:
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as error:
        raise ModelNotFoundError(
            f"Could not read {adapter_config} ({error}); re-save the adapter with save_pretrained."
        ) from error
    if not base:
        raise ModelNotFoundError(
            f"Adapter {name!r} does not name its base model (base_model_name_or_path is empty); "
            "load the base model and pass the adapter as adapter=."
        )
    base = str(base)
    beside = adapter_config.parent / base
    if not Path(base).expanduser().exists() and not Path(base).is_absolute() and beside.exists():
        base = str(beside)
    return _resolve(base, materialize, (*seen, key))


def _resolve_graft_base(
    name: str, graft_config: Path, materialize: bool, seen: tuple[str, ...]
) -> ModelRef:
    try:
        recorded = json.loads(graft_config.read_text(encoding="utf-8"))
        base = recorded["base_model"]["name"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ModelNotFoundError(
            f"Could not read the base model of the graft mask {name!r} from {graft_config} "
            f"({error}); learn the mask again with scripts/graft.py."
        ) from None
    if str(graft_config) in seen:
        raise ModelNotFoundError(f"The graft mask {name!r} names itself as its base model.")
    return _resolve(str(base), materialize, (*seen, str(graft_config)))


def _is_hub_id(name: str) -> bool:
    if not _HUB_ID.match(name) or ".." in name or "--" in name:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = (os.environ.get(var, "").upper() for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(value in _TRUTHY for value in env) or bool(constants.HF_HUB_OFFLINE)


def _hub_cached_file(repo_id: str, filename: str) -> str | None:
    """Path of ``filename`` in the local hub cache (``main`` revision), or ``None``."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def _materialized(ref: ModelRef) -> ModelRef:
    """``ref`` with the embedded model at its root fetched, so that every path is set."""
    if ref.root.path is not None:
        return ref
    if ref.base is None:
        return resolve_model(ref.name, materialize=True)
    return replace(ref, base=_materialized(ref.base))


def _as_ref(ref_or_name: ModelRef | str | os.PathLike[str], materialize: bool = True) -> ModelRef:
    if isinstance(ref_or_name, ModelRef):
        return _materialized(ref_or_name) if materialize else ref_or_name
    return resolve_model(ref_or_name, materialize=materialize)

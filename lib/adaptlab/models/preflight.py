"""Check a model load's options against the model and this machine before any weight is read.

:func:`load_model` finds the same problems, but only after the weights (gigabytes for a large
model) are read, and as a library error. Recipes call :func:`check_load` in their setup, so a
request this machine cannot serve is refused in one sentence first::

    >>> import torch
    >>> skeleton = torch.nn.Sequential(torch.nn.Linear(32, 8))
    >>> check_load(ModelRef("m", "m", "local"), skeleton, device="cpu", quantization="4bit")
    Traceback (most recent call last):
    ...
    adaptlab.models.preflight.LoadOptionError: 4-bit quantization on a CPU needs every quantized \
layer's input size to be a multiple of 64 (bitsandbytes' block size), but 0 takes 32; drop \
--quantization or run on a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from adaptlab.errors import UserError
from adaptlab.models.adapters_loading import check_adapter
from adaptlab.models.loader import pick_attn_implementation, pick_dtype
from adaptlab.models.refs import ModelRef

# bitsandbytes packs 4-bit weights for its CPU kernels in blocks of this many input features
_CPU_4BIT_BLOCK = 64


class LoadOptionError(UserError):
    """A load option this model or machine cannot serve (attention, quantization, adapter)."""


def check_load(
    ref: ModelRef,
    skeleton: torch.nn.Module,
    *,
    device: str | torch.device,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    quantization: str | None = None,
    adapter: str | None = None,
) -> None:
    """Refuse load options that would fail once the weights are read.

    Args:
        ref: the resolved model (see :func:`adaptlab.models.resolve_model`).
        skeleton: its module tree on the meta device (:func:`adaptlab.models.model_skeleton`).
        device: the device the model will run on.
        dtype, attn_implementation, quantization, adapter: as for
            :func:`adaptlab.models.load_model`.

    Raises:
        LoadOptionError: with one sentence naming the option and what to do instead.
        ModelNotFoundError: ``adapter`` names no adapter.
    """
    if adapter is not None:
        if ref.adapters:
            raise LoadOptionError(
                f"--model {ref.name} is already an adapter folder (it names its base model), so "
                f"--adapter {adapter} would apply a second one; drop --adapter, or pass the base "
                "model as --model."
            )
        check_adapter(adapter)
    try:
        pick_attn_implementation(attn_implementation, device, pick_dtype(dtype, device))
    except ValueError as err:
        raise LoadOptionError(f"--attn_implementation: {err}") from None
    if quantization is None:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoadOptionError(
            f"--quantization {quantization} needs the bitsandbytes package; install it (pip "
            "install bitsandbytes) or drop --quantization."
        )
    if quantization == "4bit" and torch.device(device).type == "cpu":
        head = (
            skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
        )
        for name, module in skeleton.named_modules():
            if (
                isinstance(module, torch.nn.Linear)
                and module is not head  # the output layer stays unquantized
                and module.in_features % _CPU_4BIT_BLOCK
            ):
                raise LoadOptionError(
                    "4-bit quantization on a CPU needs every quantized layer's input size to be "
                    f"a multiple of {_CPU_4BIT_BLOCK} (bitsandbytes' block size), but {name} "
                    f"takes {module.in_features}; drop --quantization or run on a GPU."
                )

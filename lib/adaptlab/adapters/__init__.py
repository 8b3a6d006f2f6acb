"""Hand-written adapters that PEFT does not provide, saved as PEFT-layout adapter folders.

| module       | what                                                                        |
|--------------|-----------------------------------------------------------------------------|
| bottleneck   | Houlsby / Pfeiffer / parallel bottleneck adapters attached by forward hooks |
| folder       | the adapter-folder format and the registry of adapter kinds (``KINDS``)     |

Every kind saves the same way: ``adapter_config.json`` (``peft_type`` ``ADAPTLAB``, the kinds
and their configs, the base model) and ``adapter_model.safetensors`` (the adapter tensors
only). Such a folder is a model name like a LoRA folder: ``adaptlab.models.load_model``,
``scripts/extract_repr.py --model`` and ``scripts/compute_kernel.py --model`` load its base and
attach the adapters (:func:`load_adapter_folder`).
"""

from adaptlab.adapters.bottleneck import (  # registers its kinds in KINDS
    BottleneckAdapter,
    BottleneckConfig,
    attach_bottleneck,
    bottleneck_config,
    check_architecture,
)
from adaptlab.adapters.errors import AdapterError
from adaptlab.adapters.folder import (
    KINDS,
    AdapterKind,
    attached_kinds,
    is_adaptlab_folder,
    load_adapter_folder,
    register_kind,
    save_adapter_folder,
)

__all__ = [
    "KINDS",
    "AdapterError",
    "AdapterKind",
    "BottleneckAdapter",
    "BottleneckConfig",
    "attach_bottleneck",
    "attached_kinds",
    "bottleneck_config",
    "check_architecture",
    "is_adaptlab_folder",
    "load_adapter_folder",
    "register_kind",
    "save_adapter_folder",
]

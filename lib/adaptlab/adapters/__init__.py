"""Hand-written adapters that PEFT does not provide, saved as PEFT-layout adapter folders.

| module       | what                                                                        |
|--------------|-----------------------------------------------------------------------------|
| bottleneck   | Houlsby / Pfeiffer / parallel bottleneck adapters attached by forward hooks |
| folder       | the adapter-folder format and the registry of adapter kinds (``KINDS``)     |
| attention    | adapters inside attention: transformers' attention registry, every backend  |
| families     | where q, k, v, W_O live per architecture (Llama, GPT-2, BERT, RoBERTa)      |
| inducer      | inducer-tuning (+ Q-LoRA in ``query_lora``)                                  |
| prefix       | prefix-tuning on the attention hooks (no KV cache, so checkpointing works)  |
| kernel       | kernel-wise adapters: bandwidth, bitfit, kerfit, kerfit_sep, kerfit_X        |
| kernel_mix   | Kernel-mix: head-wise low-rank Q, V, O updates                               |
| settings     | the finetune config fields of these methods                                  |

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
from adaptlab.adapters.inducer import InducerConfig, attach_inducer  # registers "inducer"
from adaptlab.adapters.kernel import KernelAdapterConfig, attach_kernel_adapter
from adaptlab.adapters.kernel_mix import KernelMixConfig, attach_kernel_mix
from adaptlab.adapters.prefix import PrefixConfig, attach_prefix

__all__ = [
    "KINDS",
    "AdapterError",
    "InducerConfig",
    "KernelAdapterConfig",
    "KernelMixConfig",
    "PrefixConfig",
    "attach_inducer",
    "attach_kernel_adapter",
    "attach_kernel_mix",
    "attach_prefix",
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

"""Hand-written adapters that PEFT does not provide.

| module       | what                                                                      |
|--------------|---------------------------------------------------------------------------|
| bottleneck   | Houlsby / Pfeiffer / parallel bottleneck adapters attached by forward hooks |
"""

from adaptlab.adapters.bottleneck import (
    AdapterError,
    BottleneckAdapter,
    BottleneckConfig,
    attach_bottleneck,
    bottleneck_config,
    check_architecture,
    load_bottleneck,
    save_bottleneck,
)

__all__ = [
    "AdapterError",
    "BottleneckAdapter",
    "BottleneckConfig",
    "attach_bottleneck",
    "bottleneck_config",
    "check_architecture",
    "load_bottleneck",
    "save_bottleneck",
]

"""IVON with separate gradient samples: the part of the optimisers that needs ``ivon-opt``.

``ivon-opt`` is GPL-3.0-or-later, so adaptlab (Apache-2.0) does not depend on it: it is only a
test dependency (the ``dev`` extra), kept to compare adaptlab's own IVON against, and only this
module imports it. :mod:`adaptlab.training.optim` imports this module when ``optimizer=ivon_opt``
is asked for and says that it is a GPL test dependency when it is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import ivon
import torch

from adaptlab.training.errors import TrainingError


class CheckedIVON(ivon.IVON):
    """``ivon.IVON`` whose gradient samples stay separate and whose empty step is an error.

    Two changes, numerics otherwise untouched:

    - ``sampled_params(train=True)`` zeroes the gradients on entry, so the sample IVON reads on
      exit is the gradient of that forward/backward only. Upstream IVON reads ``p.grad``
      as it is, so with gradient accumulation (or several MC draws without ``zero_grad``) it
      averages running sums instead of samples and pairs each noise draw with the wrong
      gradient. Parameters that got no gradient contribute zeros instead of crashing.
    - ``step()`` without a gradient sample raises :class:`TrainingError` instead of IVON's
      ``TypeError: 'NoneType' object is not subscriptable`` (ivon issue #6).
    """

    def sampled_params(self, train: bool = False) -> contextlib.AbstractContextManager[None]:
        """Perturb the weights by one posterior draw; with ``train`` record the gradient."""
        return separate_sample(self, train)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update the posterior from the gradient samples collected since the last step."""
        if closure is None and self.state["count"] == 0:
            raise TrainingError(
                "IVON step() found no gradient sample; run every micro-batch's forward and "
                "backward inside ivon_step_context(optimizer) before calling step()."
            )
        return super().step(closure)


@contextlib.contextmanager
def separate_sample(optimizer: ivon.IVON, train: bool) -> Iterator[None]:
    """One posterior draw of the weights; with ``train``, the gradient inside is one sample.

    The gradients are zeroed on entry so the sample holds this draw's backward only; parameters
    that got no gradient contribute zeros.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p is not None]
    if train:
        for param in params:
            if param.grad is not None:
                param.grad.zero_()
    with ivon.IVON.sampled_params(optimizer, train=train):
        yield
        if train:
            for param in params:
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)

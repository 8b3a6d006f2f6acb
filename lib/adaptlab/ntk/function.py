"""The function whose eNTK is taken: head logits f(x; θ) ``[B, C]`` of a model (kernel.md §4-§5).

Two heads, both read one position per example (``batch["positions"]``):

| head            | f(x)                                                           |
|-----------------|----------------------------------------------------------------|
| ``label_words`` | LM logits of the C label words at the position                 |
| ``linear_head`` | a linear head on the last hidden state at the position        |

The position is the mask token for a masked LM and the last prompt token for a causal LM.

Binary mode (C = 2) gives one output, f = logit₁ − logit₀ ``[B, 1]``. The model runs in eval
mode (no dropout) and without ``token_type_ids``. Parameters enter as a dict (names as in
``model.named_parameters()``, the linear head's prefixed with ``head.``): the ones given
replace the model's, the others stay as they are, so parameters left out act as constants::

    fn = KernelFunction(model, head="label_words", label_word_ids=[17, 42])
    params = select_parameters(model)
    scores = fn(params, batch)  # [B, 2]

Batches are dicts of ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` (right padding),
``positions`` ``[B]`` and optionally ``label_word_ids`` ``[C]`` and ``class_labels`` ``[B]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adaptlab.extract.points import unwrap
from adaptlab.ntk.errors import KernelError

HEAD_PREFIX = "head."


class _Root(nn.Module):
    """Model and linear head under one module, so one ``functional_call`` reaches both."""

    def __init__(
        self, model: nn.Module, head: nn.Module | None, forward: Callable[..., Tensor]
    ) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self._forward = forward

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        return self._forward(batch)


class KernelFunction:
    """f(x; θ) ``[B, C]``: the head logits the kernel differentiates.

    Args:
        model: a Hugging Face causal or masked LM (PEFT-wrapped models included).
        head: ``"label_words"`` (LM logits of the label words) or ``"linear_head"``.
        label_word_ids: ``[C]`` vocabulary id of each class's label word (label_words head);
            ``None`` reads ``batch["label_word_ids"]``.
        linear_head: module applied to the ``[B, 1, H]`` last hidden states at ``positions``,
            giving C logits per example (an ``nn.Linear(H, C)`` or a ``LinearHead``).
        binary: one output f = logit₁ − logit₀ (needs C = 2).

    Raises:
        KernelError: an unknown head, a head without what it needs, or binary mode with
            C != 2.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        head: Literal["label_words", "linear_head"],
        label_word_ids: Sequence[int] | None = None,
        linear_head: nn.Module | None = None,
        binary: bool = False,
    ) -> None:
        if head not in ("label_words", "linear_head"):
            raise KernelError(f"Unknown kernel head {head!r}; choose label_words or linear_head.")
        if head == "linear_head" and linear_head is None:
            raise KernelError("head='linear_head' needs linear_head=nn.Linear(hidden, classes).")
        if head == "label_words" and linear_head is not None:
            raise KernelError("linear_head is only used with head='linear_head'; drop it.")
        self.model = model.eval()
        self.head = head
        self.linear_head = None if linear_head is None else linear_head.eval()
        self.label_word_ids = (
            None if label_word_ids is None else torch.as_tensor(list(label_word_ids)).long()
        )
        self.binary = binary
        self.n_classes = self._count_classes()
        if binary and self.n_classes not in (None, 2):
            raise KernelError(
                f"Binary mode needs 2 classes but the head has {self.n_classes}; drop binary=True."
            )
        self.root = _Root(self.model, self.linear_head, self.forward)

    def _count_classes(self) -> int | None:
        if self.head == "label_words":
            return None if self.label_word_ids is None else len(self.label_word_ids)
        out = getattr(self.linear_head, "out_features", None)
        inner = getattr(self.linear_head, "linear", None)
        return out if out is not None else getattr(inner, "out_features", None)

    @property
    def n_outputs(self) -> int:
        """Outputs per example: C, or 1 in binary mode (C is known once a batch was seen)."""
        if self.binary:
            return 1
        if self.n_classes is None:
            raise KernelError(
                "The number of classes is unknown until a batch is seen; pass label_word_ids."
            )
        return self.n_classes

    def root_name(self, name: str) -> str:
        """Name of parameter ``name`` inside :attr:`root`."""
        return name if name.startswith(HEAD_PREFIX) else f"model.{name}"

    def param_name(self, root_name: str) -> str:
        """Inverse of :meth:`root_name`."""
        return root_name if root_name.startswith(HEAD_PREFIX) else root_name[len("model.") :]

    def modules(self) -> Iterator[tuple[nn.Module, dict[str, str]]]:
        """Every module with parameters of its own, and ``{attribute: parameter name}``.

        Tied tensors appear under every module that holds them, named once (the first name
        ``named_parameters`` gives), so the uses of a shared tensor can be summed.
        """
        canonical: dict[int, str] = {}
        for name, param in self.root.named_parameters(remove_duplicate=False):
            canonical.setdefault(id(param), self.param_name(name))
        for module in self.root.modules():
            owned = {
                attr: canonical[id(p)] for attr, p in module._parameters.items() if p is not None
            }
            if owned:
                yield module, owned

    def __call__(self, params: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """Head logits with ``params`` in place of the model's.

        Args:
            params: parameter name -> tensor (a subset of the parameters).
            batch: see the module docstring.

        Returns:
            ``[B, C]`` logits, or ``[B, 1]`` in binary mode.
        """
        rooted = {self.root_name(name): value for name, value in params.items()}
        scores = functional_call(self.root, rooted, (batch,), strict=False, tie_weights=True)
        if self.binary:
            if scores.shape[1] != 2:
                raise KernelError(
                    f"Binary mode needs 2 classes but the batch has {scores.shape[1]}; "
                    "drop binary=True."
                )
            return scores[:, 1:] - scores[:, :1]
        return scores

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """``[B, C]`` class logits with the current parameters (called inside ``root``)."""
        positions = batch["positions"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        rows = torch.arange(len(positions), device=positions.device)
        if self.head == "linear_head":
            hidden = unwrap(self.model).base_model(**inputs).last_hidden_state
            scores = self.linear_head(hidden[rows, positions][:, None])
            return scores.reshape(len(positions), -1)
        ids = self.label_word_ids
        if ids is None:
            ids = batch.get("label_word_ids")
        if ids is None:
            raise KernelError(
                "The label_words head needs label_word_ids; pass them to KernelFunction or put "
                "them in the batch."
            )
        if ids.dim() != 1:
            raise KernelError(
                f"label_word_ids {list(ids.shape)} are per example (a multi-task batch); the "
                "kernel takes one task's [C] label words: compute it per task."
            )
        ids = ids.to(positions.device)
        if self.n_classes is None:
            self.n_classes = len(ids)
        logits = self._logits_at(inputs, positions)
        if logits.shape[1] == 1:
            return logits[:, 0, ids]
        return logits[rows, positions][:, ids]

    def _logits_at(self, inputs: dict[str, Tensor], positions: Tensor) -> Tensor:
        """LM logits ``[B, 1, V]`` at ``positions`` (``[B, T, V]`` when the head is unknown).

        The output embedding is fed only the hidden state at each row's position: the same
        numbers as indexing full logits, without the ``[B, T, V]`` tensor.
        """
        output = unwrap(self.model).get_output_embeddings()
        rows = torch.arange(len(positions), device=positions.device)

        def gather(module: nn.Module, args: tuple) -> tuple:
            hidden = args[0]
            if hidden.dim() != 3 or hidden.shape[0] != len(positions):
                return args
            return (hidden[rows, positions][:, None], *args[1:])

        handle = None if output is None else output.register_forward_pre_hook(gather)
        try:
            return self.model(**inputs).logits
        finally:
            if handle is not None:
                handle.remove()

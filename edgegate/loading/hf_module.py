"""The module a Hugging Face model is exported as: its inputs in (positionally), its logits out, no KV cache.

Stage: load (built by ``loading.hf``). Input: a ``transformers`` model and the names of the inputs the
export feeds. Output: an ``nn.Module`` whose ``forward(*inputs)`` returns the logits tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from edgegate.errors import ModelFormatError

# forward() arguments that are not model inputs (caches, flags, training targets).
NOT_INPUTS = frozenset({"self", "labels", "use_cache", "cache", "past_key_values", "return_dict", "kwargs",
                        "output_attentions", "output_hidden_states", "output_router_logits", "logits_to_keep",
                        "cache_position", "return_loss"})


class HFLogits(nn.Module):
    """A ``transformers`` model taking its inputs positionally in ``input_names`` order (or by name).

    They are passed to the model by name, so the order of ``--input`` decides the ONNX input order, not
    the model's argument order. ``use_cache`` is off: no KV cache goes in or out.
    """

    output_names = ("logits",)

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        params = inspect.signature(model.forward).parameters
        allowed = [n for n, p in params.items()
                   if n not in NOT_INPUTS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [n for n in input_names if n not in allowed]
        if unknown:
            raise ModelFormatError(f"{type(model).__name__} has no input {unknown[0]!r}; its inputs are "
                                   f"{', '.join(allowed)}")
        self.model = model
        self.input_names = tuple(input_names)
        self._flags = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        if len(args) > len(self.input_names):
            raise TypeError(f"{len(args)} inputs given; the model takes {', '.join(self.input_names)}")
        feeds = dict(zip(self.input_names, args, strict=False)) | kwargs
        out = self.model(**feeds, **self._flags, return_dict=True)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out[0]

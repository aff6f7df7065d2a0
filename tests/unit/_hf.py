"""The tiny Hugging Face models of ``edgegate.zoo.hf``, trained once per test session."""

from __future__ import annotations

import copy
import functools

from edgegate.zoo.hf import ARCHS, CONTEXT, VOCAB, LMLogits, build, markov, n_params
from edgegate.zoo.hf import trained as _train

__all__ = ["ARCHS", "CONTEXT", "VOCAB", "LMLogits", "build", "markov", "n_params", "trained"]


@functools.cache
def _trained(arch: str) -> LMLogits:
    return _train(arch)


def trained(arch: str) -> LMLogits:
    """A trained tiny model of ``arch`` (trained once per session; each call returns a copy)."""
    return copy.deepcopy(_trained(arch))

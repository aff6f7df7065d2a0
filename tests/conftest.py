"""Shared fixtures. ``zoo_model(name)`` trains each zoo model once per test session."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(scope="session")
def zoo_model() -> Callable[[str], tuple[Any, dict[str, Any]]]:
    """Factory: ``zoo_model(name) -> (model in eval mode, metrics)``, trained once per session.

    Each call returns a deep copy, so a test may quantize or mutate its model without affecting others.
    """
    from edgegate import zoo

    cache: dict[str, tuple[Any, dict[str, Any]]] = {}

    def get(name: str) -> tuple[Any, dict[str, Any]]:
        if name not in cache:
            cache[name] = zoo.train(name)
        model, metrics = cache[name]
        return copy.deepcopy(model).eval(), copy.deepcopy(metrics)

    return get

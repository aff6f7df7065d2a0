"""Tiny test-only nn.Modules for the loading tests (importable by class path, with get_config)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TinyNet(nn.Module):
    """Linear -> ReLU -> Linear; `hidden` is the constructor config that get_config() round-trips."""

    def __init__(self, in_features: int = 4, hidden: int = 8, out_features: int = 3) -> None:
        super().__init__()
        self.in_features, self.hidden, self.out_features = in_features, hidden, out_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def get_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "hidden": self.hidden, "out_features": self.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def relu_onnx_bytes() -> bytes:
    """A valid one-node ONNX model (Relu on [2]), serialized: the smallest file detected as ONNX."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()

"""ONNX passes: plain functions ``ModelProto -> ModelProto``, one per file.

Each pass's docstring says what it matches and what it guarantees. Tests run ``onnx.checker`` and
shape inference after each. To write one: take a ModelProto, never mutate the caller's copy unless
the docstring says so, return the new model.
"""

from edgegate.onnx_export.passes.attach_functions import attach_functions, iter_nodes
from edgegate.onnx_export.passes.strip_debug_metadata import strip_debug_metadata

__all__ = ["attach_functions", "iter_nodes", "strip_debug_metadata"]

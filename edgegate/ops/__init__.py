"""The gating-op vocabulary at the bottom of every stage (DESIGN §4): one definition per op.

``catalog`` (the ops and their numpy references), ``packing`` (ternary 2-bit packing) and
``backends`` need numpy only, so ``import edgegate.ops`` works without torch or onnx. The torch
custom ops live in ``edgegate.ops.torch_ops`` and the ONNX functions in ``edgegate.ops.onnx_function``.
"""

from edgegate.ops.catalog import CATALOG, DOMAIN, DOMAIN_VERSION, AttrDef, OpDef, Scoring, reference
from edgegate.ops.packing import TERNARY_LUT, pack_ternary, unpack_ternary

__all__ = ["CATALOG", "DOMAIN", "DOMAIN_VERSION", "TERNARY_LUT", "AttrDef", "OpDef", "Scoring", "pack_ternary",
           "reference", "unpack_ternary"]

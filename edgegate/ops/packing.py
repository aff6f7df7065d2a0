"""Ternary weight packing: 2-bit codes, 4 weights a byte, least significant bits first (one copy).

Codes: 0b00 -> 0, 0b01 -> +1, 0b11 -> -1 (two's complement); 0b10 is unused. Used by the
``TernaryMatMul`` op, the ternary layers, the ONNX lowerings and the snn core image. numpy only.
"""

from __future__ import annotations

import numpy as np

# 2-bit ternary code -> weight.
TERNARY_LUT = np.array([0, 1, 0, -1], dtype=np.int8)



def pack_ternary(w: np.ndarray) -> np.ndarray:
    """Pack a ternary matrix [N, K] in {-1, 0, +1} into uint8 [N, ceil(K/4)], 4 weights a byte, LSB first."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.isin(w, (-1, 0, 1)).all():
        raise ValueError("pack_ternary expects a 2-D array with values in {-1, 0, +1}")
    n, k = w.shape
    codes = np.where(w < 0, 3, w).astype(np.uint8)
    codes = np.pad(codes, ((0, 0), (0, (-k) % 4))).reshape(n, -1, 4)
    return (codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, in_features: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary` (numpy reference of the unpack inside ``TernaryMatMul``)."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=-1).reshape(packed.shape[0], -1)
    return TERNARY_LUT[codes[:, :in_features]]

"""2-bit ternary packing for the core image, the same encoding as ``edgegate.export.ops.pack_ternary``.

Kept here (numpy only) because the runtime side must not import ``edgegate.export`` (it needs onnx).
Codes: 0b00 -> 0, 0b01 -> +1, 0b11 -> -1, 4 weights a byte, least significant bits first.
"""

from __future__ import annotations

import numpy as np


def pack_ternary(w: np.ndarray) -> np.ndarray:
    """[N, K] values in {-1, 0, 1} -> uint8 [N, ceil(K / 4)]."""
    n, k = w.shape
    codes = np.where(w < 0, 3, w).astype(np.uint8)
    codes = np.pad(codes, ((0, 0), (0, (-k) % 4))).reshape(n, -1, 4)
    return (codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)).astype(np.uint8)

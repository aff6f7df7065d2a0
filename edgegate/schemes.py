"""The quantization vocabulary every stage shares: the numeric scheme of an export.

Bottom layer (standard library and ``edgegate.errors`` only), so the CLI, the pipeline, the quantize step,
the targets and the runtime side all speak of schemes with one type instead of string spellings.
Input: a scheme's name (``--quant``, a manifest's ``quant.scheme``, a sweep spec). Output: a `QuantScheme`.
"""

from __future__ import annotations

from enum import StrEnum

from edgegate.errors import EdgegateError


class QuantScheme(StrEnum):
    """How an export stores and computes its weights and activations."""

    FP32 = "fp32"  # the float model as trained
    FP16 = "fp16"  # half precision where the target supports it (trt); no calibration
    INT8 = "int8"  # int8 per-channel weights, 8-bit activations calibrated gate-aware
    TERNARY = "ternary"  # {-1, 0, +1} x scale weights, 2-bit packed (optionally a low-rank float correction)

    @property
    def calibrated(self) -> bool:
        """Whether the scheme needs calibration data (activation ranges, ternary error weighting)."""
        return self in (QuantScheme.INT8, QuantScheme.TERNARY)

    @classmethod
    def parse(cls, value: str | QuantScheme, what: str = "--quant") -> QuantScheme:
        """``value`` as a scheme; an unknown one is a one-line error listing the known ones."""
        try:
            return cls(value)
        except ValueError:
            raise EdgegateError(f"{what} {value} is unknown; use one of {', '.join(cls)}") from None

"""Gate-aware calibration (DESIGN §5): path-conditional statistics, coverage, threshold re-tuning, fidelity.

Stage: calibrate. Input: a float model, calibration data, a ``QuantConfig`` and the model's ``GateMap``.
Output: the calibrated fake-quant model and a ``CalibrationRecord`` (with the ``QuantPlan`` hand-off
for the ONNX lowering); ``measure_fidelity`` compares float and quantized models on held-out data.
"""

from edgegate.calibration.fidelity import HIGHER_IS_BETTER, at_least_as_good, comparable_metrics, measure_fidelity
from edgegate.calibration.record import Augmentation, CalibrationRecord, Coverage, Fallback
from edgegate.calibration.search import calibrate

__all__ = [
    "HIGHER_IS_BETTER",
    "Augmentation",
    "CalibrationRecord",
    "Coverage",
    "Fallback",
    "at_least_as_good",
    "calibrate",
    "comparable_metrics",
    "measure_fidelity",
]

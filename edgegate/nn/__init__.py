"""The gating vocabulary (DESIGN §3): modules that *are* the model families edgegate deploys.

Each module has a hard inference mode (``eval()``), records its last hard gate decision as
``last_decision`` (a detached tensor, set by eval forwards outside export) and implements
``get_config()`` so ``type(m)(**m.get_config())`` rebuilds it.
"""

from edgegate.nn.acm import ACM, ACMForm, ACMTraining
from edgegate.nn.attention import GatedAttention
from edgegate.nn.early_exit import EarlyExitNet, ExitMLP, exit_gate_mlp
from edgegate.nn.gating import ChannelGate, ThresholdGate
from edgegate.nn.moe import Activation, Expert, GatedSharedExpert, MoE, TopKRouter
from edgegate.nn.ternary import HGFLinear, TernaryLinear, quantize_activations, ternarize

__all__ = [
    "ACM",
    "ACMForm",
    "ACMTraining",
    "Activation",
    "ChannelGate",
    "EarlyExitNet",
    "ExitMLP",
    "Expert",
    "GatedAttention",
    "GatedSharedExpert",
    "HGFLinear",
    "MoE",
    "TernaryLinear",
    "ThresholdGate",
    "TopKRouter",
    "exit_gate_mlp",
    "quantize_activations",
    "ternarize",
]

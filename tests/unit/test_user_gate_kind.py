"""A gate kind edgegate does not know, declared in this module alone (no edit to edgegate): its module class
records ``last_decision``, a ``GateMeasure`` says how to measure it, ``register_family`` makes it a gate.
It is then found, calibrated with a fidelity target that holds its metric, and measured held-out."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from edgegate.calibration import calibrate, measure_fidelity
from edgegate.calibration.kinds import GateMeasure, GateMetric, metric, ranked, register_measure
from edgegate.errors import EdgegateError
from edgegate.gates import GateFamily, GateKind, GateMap, Observe, find_gates, register_family
from edgegate.metrics import decision_agreement
from edgegate.quantization.config import QuantConfig
from edgegate.reports.bundle_text import fidelity_lines

VOTE = "vote"  # the new kind: a name, not a GateKind member


class VoteGate(nn.Module):
    """Three voters score each sample; the winner's scale multiplies the features (a hard 1-of-3 decision)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(features, 3)
        self.register_buffer("scales", torch.linspace(0.5, 1.5, 3)[:, None].expand(3, features).clone())
        self.last_decision: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.proj(x).argmax(-1)
        if not self.training:
            self.last_decision = choice.detach()
        return x * self.scales[choice]


def _scores(module: nn.Module, keep: Callable[[torch.Tensor], None]) -> list:
    return [module.proj.register_forward_hook(lambda m, args, out: keep(out.float()))]


register_measure(GateMeasure(
    VOTE, (GateMetric("vote_agreement", "vote agreement", True),),
    lambda f, q, info: {"vote_agreement": decision_agreement(f.numpy(), q.numpy())},
    capture=_scores, pair=lambda info, fs, qs: [ranked(fs, qs, 1, info.name, "vote_agreement")]))
register_family(VoteGate, GateFamily(VOTE, Observe.DECISION, summary="1-of-3 vote (test kind)"))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), VoteGate(32), nn.Linear(32, 4)).eval()


def test_a_user_kind_is_found_calibrated_to_its_target_and_measured_held_out() -> None:
    model = _model()
    gates = find_gates(model)
    assert [(g.name, g.kind, g.module) for g in gates] == [("2", VOTE, "VoteGate")]
    assert GateMap.from_dict(gates.to_dict()).gates[0].kind == VOTE  # a manifest round trip keeps the name
    rng = np.random.default_rng(0)
    x_cal, x_test = (rng.standard_normal((n, 16)).astype(np.float32) for n in (256, 300))

    # A target the free means miss: the search must judge the vote's agreement and promote layers that feed it.
    qmodel, record = calibrate(model, x_cal, QuantConfig(fidelity_target=0.999, max_promoted_layers=2))
    search = record.search
    assert search is not None and search.metrics == ("vote_agreement",)
    assert all(any(e.gate == "2" and e.metric == "vote_agreement" and e.rows == 256 for e in t.measured)
               for t in search.tries)
    chosen = search.tries[search.chosen]
    assert [t.means for t in search.tries[:2]] == ["int8", "bias_correction"] and len(search.tries) >= 4
    promoted = {*chosen.settings["a16_layers"], *chosen.settings["float_layers"]}
    assert promoted and promoted <= {"0", "2.proj"}  # layers that run before the vote decides
    assert chosen.margin > search.tries[0].margin
    assert (search.warning is None) == chosen.passed
    assert chosen.passed or "reaches vote agreement" in search.warning  # the kind's own words

    fid = measure_fidelity(model, qmodel, x_test)
    with torch.no_grad():
        f = model[2].proj(model[1](model[0](torch.from_numpy(x_test)))).argmax(-1).numpy()
        qmodel(torch.from_numpy(x_test))
    q = qmodel[2].last_decision.numpy()
    gate = fid["gates"]["2"]
    assert gate["kind"] == VOTE and gate["rows"] == 300
    assert gate["vote_agreement"] == pytest.approx(float((f == q).mean()))
    assert fid["summary"]["vote_agreement"] == gate["vote_agreement"]
    assert fid["intervals"]["vote_agreement"]["rows"] == 300
    ci = gate["intervals"]["vote_agreement"]
    assert ci["low"] <= gate["vote_agreement"] <= ci["high"] and ci["rows"] == 300
    # `inspect` (runtime side, no torch, no registry) still shows the new kind's rate, by its key
    shown = "\n".join(fidelity_lines({"quant": {"scheme": "int8", "fidelity": fid}}))
    assert f"vote agreement {gate['vote_agreement']:.4f}" in shown and "over 300 rows" in shown


def test_a_metric_name_means_one_thing() -> None:
    with pytest.raises(EdgegateError, match="metric 'mask_hamming' of kind 'other' is already declared differently"):
        register_measure(GateMeasure("other", (GateMetric("mask_hamming", "flips", True),), lambda f, q, i: {}))
    assert metric("mask_hamming").higher_is_better is False
    assert str(GateKind.CHANNEL) == "channel"

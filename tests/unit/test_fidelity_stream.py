"""measure_fidelity streamed batch by batch: the output metrics equal those of the whole outputs at once.

The held-out fidelity of an int8 export keeps per batch only what the metrics need (argmax indices, SQNR
sums, summed cross-entropy) instead of both models' whole outputs; these tests compute each metric from the
whole outputs with ``edgegate.metrics`` and compare.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgegate.calibration import measure_fidelity
from edgegate.data import next_token_labels
from edgegate.metrics import sqnr_db, top1_agreement
from edgegate.nn.moe import MoE


class _TinyLM(nn.Module):
    """input_ids [N, T] -> logits [N, T, V] through one routed MoE block (a router gate to measure)."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.moe = MoE(d, 16, 4, 2)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.head(h + self.moe(h))


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    f = _TinyLM().eval()
    q = _TinyLM().eval()
    q.load_state_dict(f.state_dict())
    with torch.no_grad():  # a "quantized" model: the float one with its weights rounded to a coarse grid
        for p in q.parameters():
            p.copy_(torch.round(p * 8) / 8)
    return f, q


@pytest.mark.parametrize("batch_size", [3, None])
def test_streamed_lm_metrics_equal_whole_outputs(batch_size: int | None) -> None:
    f, q = _pair()
    ids = np.random.default_rng(1).integers(0, 11, (10, 5)).astype(np.int64)
    labels = np.random.default_rng(2).integers(0, 11, 10).astype(np.int64)
    got = measure_fidelity(f, q, {"input_ids": ids}, labels, batch_size=batch_size)
    with torch.no_grad():
        fo, qo = f(torch.from_numpy(ids)), q(torch.from_numpy(ids))
    assert got["samples"] == 10 and got["scored_tokens"] == 50
    assert got["top1_agreement"] == pytest.approx(top1_agreement(fo.numpy(), qo.numpy()), abs=1e-12)
    assert 0.0 < got["top1_agreement"] < 1.0  # the rounding moved some argmaxes: the count is exercised
    assert got["output_sqnr_db"] == pytest.approx(sqnr_db(fo.numpy(), qo.numpy()), rel=1e-9)
    y = torch.from_numpy(next_token_labels({"input_ids": ids}, labels, tuple(fo.shape)))
    for name, out in (("float", fo), ("quant", qo)):
        assert got["accuracy"][name] == pytest.approx(float((out.argmax(-1) == y).float().mean()), abs=1e-12)
        assert got["loss"][name] == pytest.approx(float(F.cross_entropy(out.reshape(-1, 11), y.reshape(-1))),
                                                  rel=1e-5)
    assert got["intervals"]["top1_agreement"]["rows"] == 50
    router = got["gates"]["moe.router"] if "moe.router" in got["gates"] else next(iter(got["gates"].values()))
    assert router["rows"] == 50 and 0.0 <= router["topk_set_agreement"] <= 1.0


def test_streamed_classifier_equals_whole_batch() -> None:
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5)).eval()
    q = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5)).eval()
    q.load_state_dict({k: torch.round(v * 4) / 4 for k, v in f.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((37, 6)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 5, 37)
    whole = measure_fidelity(f, q, x, labels)
    streamed = measure_fidelity(f, q, x, labels, batch_size=8)
    assert "task" not in streamed and streamed["samples"] == 37
    for key in ("top1_agreement", "output_sqnr_db"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-6)
        assert math.isfinite(streamed[key])
    for key in ("accuracy", "loss"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-6)
    with torch.no_grad():
        want = float(F.cross_entropy(q(torch.from_numpy(x)), torch.from_numpy(labels)))
    assert streamed["loss"]["quant"] == pytest.approx(want, rel=1e-5)

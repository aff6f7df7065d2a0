"""The public API of ``edgegate``: one lazily imported function per pipeline stage."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import edgegate
from edgegate import targets
from edgegate.errors import TargetError


def test_every_public_name_resolves():
    for name in edgegate.__all__:
        assert getattr(edgegate, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        edgegate.nope  # noqa: B018


def test_import_edgegate_pulls_in_neither_torch_nor_onnx():
    code = ("import sys, edgegate; edgegate.read_bundle; edgegate.bench; "
            "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stages_chain_through_the_api(zoo_model):
    model, _ = zoo_model("threshold_gate")
    gates = edgegate.find_gates(model)
    assert len(gates) >= 1
    x = torch.rand(8, 64)
    proto = edgegate.export_onnx(model, x, "x")
    artifact = edgegate.compile(proto, "cpu")
    with targets.get("cpu").load(artifact) as runner:
        (name,) = [n for n in runner.output_names if n == "logits"] or runner.output_names[:1]
        got = runner.run({"x": x.numpy()})[name]
    with torch.no_grad():
        want = model(x)
    want = want[0] if isinstance(want, tuple) else want
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_compile_names_the_unknown_target():
    with pytest.raises(TargetError, match="unknown target 'nope'"):
        edgegate.compile(None, "nope")

"""The pipeline's step plumbing: golden outputs computed before compile, intermediates kept on request."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgegate import export
from edgegate.bundle import read_bundle
from edgegate.data import Inputs
from edgegate.errors import ExportError
from edgegate.golden import run_golden, torch_outputs, whole_batches

SAMPLES, BATCH = 12, 5  # a static batch that does not divide the samples: golden tiles them to 10


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(SAMPLES, 6)
    out = tmp_path_factory.mktemp("steps") / "mlp.edgegate"
    path = export(model, x, out=out, batch=BATCH, keep_intermediate=True)
    return model, x, read_bundle(path)


def test_golden_rows_are_whole_batches_of_the_model_outputs(mlp_bundle) -> None:
    model, x, bundle = mlp_bundle
    golden = np.load(bundle.file("golden_io.npz"))
    assert golden["input.input"].shape == (10, 6) and np.array_equal(golden["input.input"], x[:10].numpy())
    with torch.no_grad():
        want = model(x[:10]).numpy()
    np.testing.assert_allclose(golden["output.logits"], want, atol=1e-5)
    assert bundle.manifest["golden"]["samples"] == 10 and bundle.manifest["golden"]["atol"] == 1e-4
    assert bundle.manifest["golden"]["vs_torch"]["logits_max_abs_err"] <= 1e-5


def test_intermediates_are_written_only_when_kept(mlp_bundle) -> None:
    _, _, bundle = mlp_bundle
    steps = bundle.path.with_name(bundle.path.name + ".steps")
    assert sorted(p.name for p in steps.iterdir()) == ["export_onnx.onnx", "lowered.onnx"]
    lowered = onnx.load(str(steps / "lowered.onnx"))
    shipped = onnx.load(str(bundle.file("model.onnx")))
    assert [n.op_type for n in lowered.graph.node] == [n.op_type for n in shipped.graph.node]
    assert lowered.graph.input[0].type.tensor_type.shape.dim[0].dim_value == BATCH


def test_precomputed_reference_outputs_equal_the_model_run(mlp_bundle) -> None:
    model, x, bundle = mlp_bundle
    xs = Inputs({"input": x.numpy()})
    onnx_bytes = bundle.file("model.onnx").read_bytes()
    want = torch_outputs(model, xs, BATCH)
    assert len(whole_batches(xs, BATCH)) == 10 and want[0].shape == (10, 3)
    npz, rows, got, from_model = run_golden(onnx_bytes, model, xs, ["logits"], BATCH)
    npz2, rows2, got2, from_list = run_golden(onnx_bytes, want, xs, ["logits"], BATCH)
    assert npz == npz2 and np.array_equal(from_model[0], from_list[0]) and np.array_equal(got[0], got2[0])
    assert len(rows) == len(rows2) == 10
    with pytest.raises(ExportError, match=r"torch model gives 2 output\(s\), the graph 1 \(logits\)"):
        run_golden(onnx_bytes, want + want, xs, ["logits"], BATCH)

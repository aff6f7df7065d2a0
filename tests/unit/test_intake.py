"""Intake: --input specs, several inputs (Inputs), --holdout splits, the Python API with an nn.Module, the
convert step, formats that cannot be exported, and one-line exporter errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import edgegate
from edgegate import convert as convert_registry
from edgegate.convert import registry as converter_table
from edgegate.data import Dataset, Inputs, TensorSpec, load_data, split_data
from edgegate.errors import DataError, ExportError
from edgegate.loading import model_inputs, parse_input, parse_inputs
from edgegate.onnx_export.torch_export import CONTROL_FLOW_HINT, MAX_ERROR, exporter_error
from tests.unit._intake_models import AudioLike, GatedMLP, HardThreshold

# ------------------------------------------------------------------------------------------- --input


@pytest.mark.parametrize(("text", "want"), [
    ("x:1x3x224x224", TensorSpec("x", (3, 224, 224), "float32")),
    ("input_ids:1x128:int64", TensorSpec("input_ids", (128,), "int64")),
    ("sr:4", TensorSpec("sr", (), "float32")),
    ("mask:2X16:bool", TensorSpec("mask", (16,), "bool")),
])
def test_input_spec_parses_batch_first(text, want):
    assert parse_input(text) == want


@pytest.mark.parametrize(("text", "match"), [
    ("x", "is not NAME:SHAPE"),
    ("x:1x3:float32:extra", "is not NAME:SHAPE"),
    ("1x:1x3", "must be an identifier"),
    ("x:1x-3", "sizes joined by 'x'"),
    ("x:1xx3", "sizes joined by 'x'"),
    ("x:0x3", "every size must be 1.."),
    ("x:1x3:complex64", "dtype 'complex64' is not one of"),
])
def test_bad_input_spec_is_one_line(text, match):
    with pytest.raises(ExportError, match=match) as e:
        parse_input(text)
    assert "\n" not in str(e.value)


def test_input_given_twice_and_no_inputs_recorded():
    with pytest.raises(ExportError, match="--input x is given twice"):
        parse_inputs(["x:1x4", "x:1x8"])
    with pytest.raises(ExportError, match="does not record its inputs: pass --input NAME:SHAPE"):
        model_inputs({})
    given = parse_inputs(["a:1x2", "b:1x3:int64"])
    recorded = {"meta": {"inputs": [{"name": "z", "shape": [5], "dtype": "float32"}]}}
    assert model_inputs(recorded, given) == given  # --input replaces what the file records
    assert model_inputs(recorded) == (TensorSpec("z", (5,), "float32"),)


# ------------------------------------------------------------------------------------------- Inputs


def test_inputs_slice_concat_and_run_positionally():
    x = Inputs({"a": np.arange(6).reshape(3, 2), "b": np.arange(3)[:, None] * 10})
    assert len(x) == 3 and x.names == ("a", "b")
    assert x[1:].arrays["b"].tolist() == [[10], [20]]
    assert x[np.array([2, 0])].arrays["a"].tolist() == [[4, 5], [0, 1]]
    both = Inputs.concat([x[:1], x[2:]])
    assert both.arrays["a"].tolist() == [[0, 1], [4, 5]] and both.arrays["b"].tolist() == [[0], [20]]
    t = x.map(torch.from_numpy)
    assert Inputs.concat([t[:2], t[2:]]).arrays["b"].tolist() == [[0], [10], [20]]
    assert t.run(lambda a, b: (a.sum() + b.sum()).item()) == 15 + 30  # positional, in order
    assert Inputs.of(np.zeros((2, 3)), ["x"]).names == ("x",)
    with pytest.raises(DataError, match="2 input arrays given for 1 model inputs"):
        Inputs.of((np.zeros(2), np.zeros(2)), ["x"])


def test_split_data_uses_a_file_in_full_or_holds_out_a_fixed_share(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.arange(200, dtype=np.float32)[:, None], sr=np.ones((200, 1), np.float32))
    data = load_data(path, ["x", "sr"])
    calib, held = split_data(data)
    assert held is None and len(calib) == 200
    calib, held = split_data(data, 0.25)
    assert (len(calib), len(held)) == (150, 50)
    rows = np.concatenate([calib.inputs["x"][:, 0], held.inputs["x"][:, 0]])
    assert sorted(rows.tolist()) == list(range(200))  # disjoint, nothing lost
    again = split_data(load_data(path, ["x", "sr"]), 0.25)[1]
    assert np.array_equal(again.inputs["x"], held.inputs["x"])  # the same rows on every run
    with pytest.raises(DataError, match="clusters already holds out every row it does not calibrate on"):
        split_data(load_data("clusters", ["x"]), 0.2)
    calib, held = split_data(load_data("clusters", ["x"]))  # val + 424 train rows; the split: test_data_split.py
    assert (len(calib), len(held), len(held.splits["test"]), len(held.splits["train"])) == (1024, 2976, 600, 2376)
    with pytest.raises(DataError, match="--holdout needs at least 2"):
        split_data(Dataset("one", {"x": np.zeros((1, 2))}, None, {}, {"kind": "npz"}), 0.5)


# ------------------------------------------------------------------------------------------- API


def test_api_exports_a_module_with_two_example_inputs(tmp_path):
    torch.manual_seed(0)
    model = AudioLike().eval()
    x, sr = torch.randn(5, 1, 16), torch.full((5, 1), 8000.0)
    path = edgegate.export(model, (x, sr), out=tmp_path / "b")
    m = json.loads((path / "manifest.json").read_text())
    assert m["source"]["format"] == "nn-module" and m["source"]["file"] is None
    assert m["export"]["inputs"] == [{"name": "x", "shape": [1, 16], "dtype": "float32"},
                                     {"name": "sr", "shape": [1], "dtype": "float32"}]
    proto = onnx.load(str(path / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["x", "sr"]
    golden = np.load(path / "golden_io.npz")
    assert sorted(golden.files) == ["input.sr", "input.x", "output.logits"]
    np.testing.assert_array_equal(golden["input.sr"], sr.numpy())  # the examples are the golden samples
    with torch.no_grad():
        np.testing.assert_allclose(golden["output.logits"], model(x, sr).numpy(), atol=1e-5)
    with pytest.raises(DataError, match=r"1 example input\(s\) given for a model that takes 2 \(x, sr\)"):
        edgegate.export(model, x, out=tmp_path / "c")
    with pytest.raises(edgegate.errors.EdgegateError, match="unknown option 'bogus'"):
        edgegate.export(model, (x, sr), out=tmp_path / "d", bogus=1)
    with pytest.raises(ExportError, match="--holdout sets aside rows of the calibration data: it needs --quant"):
        edgegate.export(model, (x, sr), out=tmp_path / "e", holdout=0.2)
    assert not any((tmp_path / n).exists() for n in "cde")


def test_holdout_flag_must_be_a_fraction(capsys):
    from edgegate.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "m.pt", "--holdout", "1.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--holdout: 1.5 must be a fraction between 0 and 1" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------- convert


def _to_threshold_gate(module: HardThreshold, shift: float = 0.0):
    from edgegate.nn import ThresholdGate

    gate = ThresholdGate(len(module.tau))
    with torch.no_grad():
        gate.tau.copy_(module.tau + shift)
    return gate, "threshold"


def _register(monkeypatch, converter) -> None:
    # A converter for the user's own gate class, registered for this test only.
    path = convert_registry.class_path(HardThreshold)
    monkeypatch.setitem(converter_table._CONVERTERS, path,
                        converter_table.ConverterInfo(path, converter, family="threshold"))


def test_convert_step_runs_verifies_and_records(tmp_path, monkeypatch):
    _register(monkeypatch, _to_threshold_gate)
    torch.manual_seed(0)
    model = GatedMLP().eval()
    path = edgegate.export(model, torch.randn(32, 6), out=tmp_path / "b")
    m = json.loads((path / "manifest.json").read_text())
    conv = m["conversion"]
    assert conv["converted"] == [{"path": "gate", "source_class": convert_registry.class_path(HardThreshold),
                                  "target_class": "edgegate.nn.gating:ThresholdGate", "family": "threshold"}]
    assert conv["max_abs_err"] == 0.0 and conv["rows"] == 32
    assert "convert" in m["timings_s"] and [g["kind"] for g in m["gates"]["gates"]] == ["threshold"]
    assert isinstance(model.gate, HardThreshold)  # the user's module is left as it was
    assert "ThresholdGate" in [f.name for f in onnx.load(str(path / "model.onnx")).functions]


def test_a_conversion_that_changes_the_outputs_is_refused(tmp_path, monkeypatch):
    _register(monkeypatch, lambda m: _to_threshold_gate(m, shift=0.3))
    torch.manual_seed(0)
    with pytest.raises(ExportError, match=r"the converted module gate differs from the original by [0-9.]+ \(> 0\.001"):
        edgegate.export(GatedMLP().eval(), torch.randn(32, 6), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------- refusals


def test_torchscript_and_pt2_are_refused_before_loading(tmp_path):
    model = GatedMLP().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; it is only the input here
        torch.jit.save(torch.jit.trace(model, torch.zeros(2, 6)), str(tmp_path / "ts.pt"))
    torch.export.save(torch.export.export(model, (torch.zeros(2, 6),)), str(tmp_path / "p.pt2"))
    for name, what in (("ts.pt", "TorchScript archive, which has no Python module to trace"),
                       ("p.pt2", "torch.export program")):
        with pytest.raises(ExportError, match=f"cannot export .*{name}: it is a {what}") as e:
            edgegate.export(tmp_path / name, out=tmp_path / f"{name}.out", trust_model=True)
        assert "edgegate.export(module, example_inputs)" in str(e.value) and "\n" not in str(e.value)


class _Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.relu(self.a(x)))
        if torch.softmax(logits, -1).max() > 0.9:  # an early exit written in Python
            return logits
        return self.b(torch.relu(self.a(x)))


def test_python_control_flow_gets_one_line_pointing_to_early_exit_wrap(tmp_path, capfd):
    with pytest.raises(ExportError) as e:
        edgegate.export(_Branchy().eval(), torch.randn(4, 6), out=tmp_path / "b")
    assert str(e.value) == f"cannot export _Branchy: {CONTROL_FLOW_HINT}"
    assert "EarlyExitNet.wrap(stages, heads, thresholds, policy)" in str(e.value) and "torch.cond" in str(e.value)
    assert "def forward" not in capfd.readouterr().err  # no FX graph dump on the terminal


def test_exporter_error_is_the_innermost_cause_without_ansi_or_boilerplate():
    try:
        try:
            raise ValueError("Unsupported op aten::foo\n\n    graph():\n        %x = placeholder")
        except ValueError as inner:
            raise RuntimeError("Failed to export. \x1b[96mThis is step 1/3\x1b[0m Next steps:\n- file an "
                               "issue") from inner
    except RuntimeError as e:
        line = exporter_error("Net", e)
    assert line == "torch.onnx.export failed for Net: ValueError: Unsupported op aten::foo"
    try:
        raise RuntimeError("\x1b[91m" + "y" * 1000 + "\x1b[0m")
    except RuntimeError as e:
        line = exporter_error("Net", e)
    assert "\x1b" not in line and len(line) <= len("torch.onnx.export failed for Net: ") + MAX_ERROR


def test_several_inputs_with_different_counts_are_refused():
    from edgegate.calibration import calibrate

    model = AudioLike().eval()
    with pytest.raises(DataError, match=r"different sample counts \(x=4, sr=3\)"):
        calibrate(model, {"x": np.zeros((4, 1, 16), np.float32), "sr": np.zeros((3, 1), np.float32)},
                  input_spec=[TensorSpec("x", (1, 16), "float32"), TensorSpec("sr", (1,), "float32")])


def test_readme_documents_the_intake_flags():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for text in ("## Bring your own model", "--input NAME:SHAPE[:DTYPE]", "--holdout", "docs/models.md",
                 "edgegate.export(model"):
        assert text in readme, text

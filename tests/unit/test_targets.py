"""edgegate.targets: the registry (explicit + entry points) and the `cpu` target (ONNX Runtime)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgegate import targets
from edgegate.bundle import read_bundle
from edgegate.bundle_write import write_bundle
from edgegate.errors import TargetError
from edgegate.targets import Artifact, CheckIssue, Target, TensorSpec
from edgegate.targets.cpu import CpuOptions, CpuRunner, CpuTarget

DOMAIN = "edgegate.test"
X = np.linspace(-2.0, 2.0, 12, dtype=np.float32).reshape(3, 4)
G = np.array([-1.0, 0.0, 1.0, 3.0], dtype=np.float32)


def _reference(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.maximum(x * (1.0 / (1.0 + np.exp(-g))), 0.0)


def _gate_function() -> onnx.FunctionProto:
    """SigmoidGate(x, g) = x * sigmoid(g), as a model-local function in a custom domain."""
    return helper.make_function(
        DOMAIN,
        "SigmoidGate",
        ["x", "g"],
        ["y"],
        [helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])],
        [helper.make_opsetid("", 20)],
    )


def _model(op: str = "SigmoidGate", *, with_function: bool = True) -> onnx.ModelProto:
    nodes = [
        helper.make_node(op, ["x", "g"], ["z"], domain=DOMAIN, name="gate0"),
        helper.make_node("Relu", ["z"], ["y"], name="relu0"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
        functions=[_gate_function()] if with_function else [],
        ir_version=10,
    )


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the registry, with plugins not yet loaded, so tests cannot leak targets."""
    reg = dict(targets._REGISTRY)
    monkeypatch.setattr(targets, "_REGISTRY", reg)
    monkeypatch.setattr(targets, "_plugins_loaded", False)
    monkeypatch.setattr(targets, "_entry_points", lambda: [])
    return reg


# ---------------------------------------------------------------------------------------- registry


def test_cpu_is_registered_and_available() -> None:
    cpu = targets.get("cpu")
    assert isinstance(cpu, CpuTarget) and isinstance(cpu, Target)
    assert "cpu" in [t.name for t in targets.all_targets()]
    ok, why = cpu.is_available()
    assert ok is True and why.startswith("onnxruntime 1.")


def test_unknown_target_lists_known_names(registry: dict) -> None:
    with pytest.raises(TargetError, match=r"unknown target 'tpu'; known targets: .*\bcpu\b"):
        targets.get("tpu")


def test_duplicate_name_is_an_error(registry: dict) -> None:
    with pytest.raises(TargetError, match="target 'cpu' is already registered .*edgegate.targets.cpu"):
        targets.register(CpuTarget())
    assert registry["cpu"] is targets.get("cpu")


@dataclasses.dataclass
class _FakeEntryPoint:
    name: str
    value: str
    obj: object = None
    error: Exception | None = None

    def load(self) -> object:
        if self.error is not None:
            raise self.error
        return self.obj


class _EchoTarget(CpuTarget):
    name = "echo"
    description = "a plugin target for the test"


def test_entry_point_plugins_load_and_broken_ones_are_listed(registry: dict, monkeypatch) -> None:
    class Misnamed(CpuTarget):
        name = "other"

    eps = [
        _FakeEntryPoint("echo", "fake_pkg:EchoTarget", obj=_EchoTarget),  # a class: instantiated
        _FakeEntryPoint("trt9", "fake_trt:Target", error=ImportError("No module named 'tensorrt'")),
        _FakeEntryPoint("misnamed", "fake_pkg:Misnamed", obj=Misnamed()),
        _FakeEntryPoint("cpu", "fake_pkg:Cpu", obj=CpuTarget()),  # clashes with the built-in: ignored
    ]
    monkeypatch.setattr(targets, "_entry_points", lambda: eps)
    builtin_cpu = registry["cpu"]
    names = [t.name for t in targets.all_targets()]
    assert {"cpu", "echo", "trt9", "misnamed"} <= set(names) and names == sorted(names)
    assert isinstance(targets.get("echo"), _EchoTarget)
    assert targets.get("cpu") is builtin_cpu
    broken = targets.get("trt9")
    assert broken.is_available() == (False, "plugin failed to load: ImportError: No module named 'tensorrt'")
    with pytest.raises(
        TargetError, match=r"target 'trt9' is unavailable: plugin failed to load \(ImportError"
    ):
        broken.compile(_model(), None, Path("."))
    ok, why = targets.get("misnamed").is_available()
    assert not ok and "names its target 'other', entry point says 'misnamed'" in why


# -------------------------------------------------------------------------------------- cpu: check


def test_check_accepts_local_functions_and_standard_ops() -> None:
    assert CpuTarget().check(_model()) == []


def test_check_reports_ops_without_kernel_or_function() -> None:
    model = _model("Mystery", with_function=False)
    model.functions.append(
        helper.make_function(
            DOMAIN,
            "Wrapper",
            ["a"],
            ["b"],
            [helper.make_node("NotAnOnnxOp", ["a"], ["b"], name="inner")],
            [helper.make_opsetid("", 20)],
        )
    )
    issues = CpuTarget().check(model)
    assert [(i.node, i.op_type) for i in issues] == [("gate0", "Mystery"), ("inner", "NotAnOnnxOp")]
    assert issues[0] == CheckIssue(
        node="gate0",
        op_type="Mystery",
        message="op edgegate.test::Mystery (in graph) has no onnxruntime CPU kernel "
        "and no model-local function",
        hint="attach the op's FunctionProto to model.functions (edgegate ops do this on export) "
        "or use standard ONNX ops",
    )
    assert "op ai.onnx::NotAnOnnxOp (in function edgegate.test::Wrapper)" in issues[1].message
    with pytest.raises(
        TargetError,
        match=r"cpu cannot run 2 node\(s\): gate0: op edgegate.test::Mystery .*; inner: op ai.onnx::NotAn",
    ):
        CpuTarget().compile(model, None, Path("."))


# ------------------------------------------------------------------------------------ cpu: compile


def test_compile_and_run_artifact_with_local_function(tmp_path: Path) -> None:
    options = CpuOptions(intra_op_threads=1, graph_optimization="basic")
    artifact = CpuTarget().compile(_model(), options, tmp_path)
    assert _listing(tmp_path) == []  # cpu needs no scratch files
    assert artifact.target == "cpu" and list(artifact.files) == ["model.onnx"]
    assert artifact.options == {"intra_op_threads": 1, "graph_optimization": "basic", "latency_aware": True}
    stored = onnx.load_model_from_string(artifact.files["model.onnx"])
    assert [f.name for f in stored.functions] == ["SigmoidGate"]
    with CpuTarget().load(artifact) as runner:
        assert isinstance(runner, CpuRunner) and runner.options == options
        assert runner.input_specs == (
            TensorSpec("x", ("N", 4), np.dtype(np.float32)),
            TensorSpec("g", (4,), np.dtype(np.float32)),
        )
        assert runner.output_names == ("y",)
        for _ in range(3):
            out = runner.run({"x": X, "g": G})
        assert list(out) == ["y"] and out["y"].shape == (3, 4)
        np.testing.assert_allclose(out["y"], _reference(X, G), rtol=1e-6, atol=1e-7)
        assert len(runner.latencies_ms) == 3 and all(t > 0 for t in runner.latencies_ms)
    with pytest.raises(TargetError, match="cpu runner is closed"):
        runner.run({"x": X, "g": G})


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_compile_rejects_a_graph_the_checker_refuses() -> None:
    model = _model()
    model.graph.node[1].input[0] = "undefined_tensor"
    with pytest.raises(TargetError, match="model fails the ONNX checker: .*undefined_tensor"):
        CpuTarget().compile(model, None, Path("."))


def test_compile_rejects_external_data() -> None:
    model = _model()
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value="w.bin")
    model.graph.initializer.append(t)
    with pytest.raises(TargetError, match="model keeps tensor w in external data 'w.bin'"):
        CpuTarget().compile(model, None, Path("."))


def test_options_are_validated() -> None:
    with pytest.raises(
        TargetError, match="graph_optimization='max' must be one of disable, basic, extended, all"
    ):
        CpuOptions(graph_optimization="max")
    with pytest.raises(TargetError, match="intra_op_threads=-1 must be an int >= 0"):
        CpuOptions(intra_op_threads=-1)
    with pytest.raises(TargetError, match=r"unknown keys \['threads'\]"):
        CpuOptions.from_manifest({"threads": 2})
    with pytest.raises(TargetError, match="compile options must be CpuOptions, not dict"):
        CpuTarget().compile(_model(), {"intra_op_threads": 1}, Path("."))


# -------------------------------------------------------------------------------- cpu: bundles


def _bundle(tmp_path: Path, target: str = "cpu") -> Path:
    artifact = CpuTarget().compile(_model(), CpuOptions(intra_op_threads=1), tmp_path)
    manifest = {"target": target, "target_options": artifact.options}
    return write_bundle(tmp_path / "b", artifact.files, manifest)


def test_load_bundle_by_path_and_by_bundle(tmp_path: Path) -> None:
    out = _bundle(tmp_path)
    for source in (out, str(out), read_bundle(out)):
        with CpuTarget().load(source) as runner:
            assert runner.options == CpuOptions(intra_op_threads=1)
            np.testing.assert_allclose(
                runner.run({"x": X, "g": G})["y"], _reference(X, G), rtol=1e-6, atol=1e-7
            )


def test_load_refuses_a_bundle_for_another_target(tmp_path: Path) -> None:
    out = _bundle(tmp_path, target="trt")
    with pytest.raises(TargetError, match="is for target 'trt', not cpu"):
        CpuTarget().load(out)
    with pytest.raises(TargetError, match="artifact for target 'trt' has no cpu model.onnx"):
        CpuTarget().load(Artifact("trt", {"engine.plan": b""}, {}))


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"x": X}, r"inputs missing \['g'\], unexpected \[\]; the model takes \['x', 'g'\]"),
        ({"x": X, "g": G, "h": G}, r"inputs missing \[\], unexpected \['h'\]"),
        ({"x": X.astype(np.float64), "g": G}, "input x has dtype float64, the model wants float32; cast it"),
        ({"x": X[:, :3], "g": G}, r"input x has shape \(3, 3\), the model wants \('N', 4\)"),
        ({"x": X, "g": G[None]}, r"input g has shape \(1, 4\), the model wants \(4,\)"),
    ],
)
def test_runner_checks_feeds(feeds: dict, message: str) -> None:
    runner = CpuTarget().load(CpuTarget().compile(_model(), None, Path(".")))
    with pytest.raises(TargetError, match=message):
        runner.run(feeds)
    assert runner.latencies_ms == []


def test_runtime_side_needs_neither_torch_nor_onnx(tmp_path: Path) -> None:
    out = _bundle(tmp_path)
    script = (
        "import json, sys\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "sys.modules['onnx'] = None\n"
        "import numpy as np\n"
        "import edgegate.bundle, edgegate.targets, edgegate.targets.cpu\n"
        "from edgegate import targets\n"
        "x = np.linspace(-2.0, 2.0, 12, dtype=np.float32).reshape(3, 4)\n"
        "g = np.array([-1.0, 0.0, 1.0, 3.0], dtype=np.float32)\n"
        "with targets.get('cpu').load(sys.argv[1]) as r:\n"
        "    y = r.run({'x': x, 'g': g})['y']\n"
        "print(json.dumps({'y': y.tolist(), 'torch': sys.modules['torch'], 'onnx': sys.modules['onnx']}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["torch"] is None and result["onnx"] is None
    np.testing.assert_allclose(
        np.array(result["y"], dtype=np.float32), _reference(X, G), rtol=1e-6, atol=1e-7
    )

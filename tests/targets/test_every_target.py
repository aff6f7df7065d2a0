"""The target tier: every registered target honours the same contract, each within its own tolerance.

One small float MLP goes through check -> compile -> load -> run on every target registered (built-in and
plugins); a target that cannot compile here (its runtime is not installed) or cannot run what it compiled
(trt without an NVIDIA GPU) is skipped at that step, never faked. The runner's outputs are held to the
target's tolerance against ONNX Runtime on the same graph: float targets (``exact``) to float round-off,
the others (snn: spikes) to the top-1 rule of the golden check. The input checks, closed runners and
foreign artifacts behave the same on every target because they live in ``targets.base``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegate import targets
from edgegate.errors import TargetError
from edgegate.golden import EXACT_ATOL, MIN_TOP1_AGREEMENT
from edgegate.targets import Artifact, CompileContext, Runner, Target, TargetBase

ROWS = 64
NAMES = [t.name for t in targets.all_targets()]


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(16, 8)), "b1": rng.normal(size=16) * 0.1, "w2": rng.normal(size=(4, 16)),
             "b2": rng.normal(size=4) * 0.1}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _inputs(n: int = 300) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32)


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"x": x})[0]


@pytest.fixture(scope="module", params=NAMES)
def compiled(request, tmp_path_factory) -> tuple[Target, Artifact]:
    target = targets.get(request.param)
    ok, why = target.is_available()
    if not ok:
        pytest.skip(f"target {target.name} is not available here: {why}")
    model = _mlp()
    assert target.check(model) == []
    x = _inputs()
    context = CompileContext(input_name="x", output_names=("logits",), calibration=x, inputs=(),
                             calibration_inputs={"x": x})
    options = targets.options_for_export(target, {}, context)
    return target, target.compile(model, options, Path(tmp_path_factory.mktemp(target.name)))


@pytest.fixture
def runner(compiled):
    target, artifact = compiled
    ok, why = target.can_run()
    if not ok:
        pytest.skip(f"target {target.name} compiles here but cannot run: {why}")
    with target.load(artifact) as r:
        yield r


@pytest.mark.parametrize("name", NAMES)
def test_registered_targets_implement_the_protocol(name):
    target = targets.get(name)
    assert isinstance(target, Target) and isinstance(target, TargetBase)
    assert target.qdq_form in ("asymmetric", "symmetric") and isinstance(target.needs_calibration, bool)
    assert all(v for v in target.option_aliases.values())
    with pytest.raises(TargetError, match="not-an-option"):
        targets.options_for_export(target, {"not-an-option": "1"}, CompileContext())


def test_compile_records_its_target_and_options(compiled):
    target, artifact = compiled
    assert artifact.target == target.name and artifact.files and isinstance(artifact.options, dict)
    assert all(isinstance(v, bytes) and v for v in artifact.files.values())


def test_runner_matches_onnx_runtime_within_the_target_tolerance(compiled, runner):
    target, artifact = compiled
    assert isinstance(runner, Runner)
    x = _inputs()[:ROWS]
    got = runner.run({"x": x})["logits"]
    want = _reference(_mlp(), x)
    assert got.shape == want.shape and len(runner.latencies_ms) == 1 and runner.latencies_ms[0] > 0
    if artifact.options.get("exact", True):
        assert float(np.abs(got - want).max()) <= EXACT_ATOL
    else:  # spikes: the golden check's rule for graphs that round
        assert float(np.mean(got.argmax(-1) == want.argmax(-1))) >= MIN_TOP1_AGREEMENT
    assert runner.metrics() is None or isinstance(runner.metrics(), dict)


def test_every_runner_checks_its_feeds_the_same_way(runner):
    x = _inputs()[:4]
    with pytest.raises(TargetError, match=r"inputs missing \['x'\], unexpected \['y'\]"):
        runner.run({"y": x})
    with pytest.raises(TargetError, match="input x has dtype float64, the .* wants float32; cast it"):
        runner.run({"x": x.astype(np.float64)})
    with pytest.raises(TargetError, match=r"input x has shape \(4, 5\)"):
        runner.run({"x": x[:, :5]})
    assert runner.latencies_ms == []  # refused feeds are not timed


def test_a_closed_runner_refuses_to_run(compiled, runner):
    target, _ = compiled
    runner.__exit__(None, None, None)
    with pytest.raises(TargetError, match=f"{target.name} runner is closed"):
        runner.run({"x": _inputs()[:2]})


def test_another_targets_artifact_or_bundle_is_refused(compiled, tmp_path):
    target, artifact = compiled
    foreign = Artifact("elsewhere", dict(artifact.files), dict(artifact.options))
    with pytest.raises(TargetError, match=f"artifact for target 'elsewhere' has no {target.name} "):
        target.load(foreign)

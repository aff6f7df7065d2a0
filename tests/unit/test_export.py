"""Export of every zoo model: edgegate ops kept by name, ORT and the ONNX reference evaluator match torch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from edgegate import zoo
from edgegate.onnx_export.passes import iter_nodes
from edgegate.onnx_export.torch_export import ExitForm, ExportOptions, export_onnx
from edgegate.ops import DOMAIN

EXPECTED_OPS = {
    "gated_attention": {"SigmoidGate"},
    "threshold_gate": {"ThresholdGate"},
    "channel_gate": {"ChannelGate"},
    "moe": {"TopKGate"},
    "acm": {"LearnerCount"},
    "moe_pp": {"TopKGate"},
    "early_exit": {"ExitDecision"},
    "ternary_lm": {"TernaryMatMul"},
    "hgf_lm": {"TernaryMatMul", "LowRankCorrection"},
    "float_lm": set(),
}
ATOL = 1e-4


def _test_inputs(name: str, n: int) -> torch.Tensor:
    return zoo.example_inputs(name, n)[0]


def _torch_outputs(model, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _session(proto: onnx.ModelProto, **kw) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    for k, v in kw.items():
        setattr(opts, k, v)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_every_zoo_model_is_covered():
    assert {e.name for e in zoo.list_models()} == set(EXPECTED_OPS)


@pytest.mark.parametrize("name", sorted(EXPECTED_OPS))
def test_export_keeps_gating_ops_and_runtimes_match_torch(name, zoo_model):
    model, _ = zoo_model(name)
    x = _test_inputs(name, 64)
    input_name = zoo.entry(name).input_names[0]
    proto = export_onnx(model, x, input_name)

    used = {n.op_type for n in iter_nodes(proto.graph) if n.domain == DOMAIN}
    assert used == EXPECTED_OPS[name]
    assert {f.name for f in proto.functions} == used
    assert all(f.domain == DOMAIN for f in proto.functions)
    onnx.checker.check_model(proto, full_check=True)
    assert b"stack_trace" not in proto.SerializeToString()

    want = _torch_outputs(model, x)
    got = _session(proto).run(None, {input_name: x.numpy()})
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)

    few = x[:16]
    got_ref = ReferenceEvaluator(proto).run(None, {input_name: few.numpy()})
    for g, w in zip(got_ref, _torch_outputs(model, few), strict=True):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_dynamic_batch_export_runs_any_batch(batch, zoo_model):
    model, _ = zoo_model("moe")
    proto = export_onnx(model, _test_inputs("moe", 8), "x")
    x = _test_inputs("moe", batch)
    got = _session(proto).run(None, {"x": x.numpy()})[0]  # logits (route_indices is the second output)
    np.testing.assert_allclose(got, _torch_outputs(model, x)[0], atol=ATOL, rtol=0)


def test_ternary_weights_are_stored_two_bit_packed(zoo_model):
    model, _ = zoo_model("ternary_lm")
    proto = export_onnx(model, _test_inputs("ternary_lm", 4), "tokens")
    packed = {i.name: i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8}
    ternary_nodes = [n for n in proto.graph.node if n.op_type == "TernaryMatMul"]
    assert ternary_nodes
    for node in ternary_nodes:
        k = next(a.i for a in node.attribute if a.name == "in_features")
        w = onnx.numpy_helper.to_array(packed[node.input[1]])
        assert w.shape[1] == (k + 3) // 4  # 4 weights per byte


class TestEarlyExit:
    def test_batch1_if_form_matches_torch_sample_by_sample(self, zoo_model):
        model, metrics = zoo_model("early_exit")
        proto = export_onnx(model, _test_inputs("early_exit", 1), "x", ExportOptions(batch=1))
        ifs = [n for n in iter_nodes(proto.graph) if n.op_type == "If"]
        assert len(ifs) == model.n_exits - 1  # nested: one If per exit but the last
        session = _session(proto)
        x = _test_inputs("early_exit", 64)
        want_logits, want_exit = _torch_outputs(model, x)
        for i in range(len(x)):
            logits, exit_index = session.run(None, {"x": x[i:i + 1].numpy()})
            assert exit_index.tolist() == [want_exit[i]]
            np.testing.assert_allclose(logits[0], want_logits[i], atol=ATOL, rtol=0)
        assert len(set(want_exit.tolist())) > 1  # the samples take more than one branch

    def test_if_form_needs_batch_one(self, zoo_model):
        from edgegate.errors import ExportError

        model, _ = zoo_model("early_exit")
        with pytest.raises(ExportError, match="batch of 1"):
            export_onnx(model, _test_inputs("early_exit", 4), "x", ExportOptions(exit_form=ExitForm.IF))

    def test_early_branch_skips_later_stages(self, zoo_model, tmp_path):
        """ORT's profile shows which nodes ran: a sample leaving at exit 0 runs none of the later Gemms."""
        model, _ = zoo_model("early_exit")
        proto = export_onnx(model, _test_inputs("early_exit", 1), "x", ExportOptions(batch=1))
        x = _test_inputs("early_exit", 256)
        _, exits = _torch_outputs(model, x)
        first, last = int(np.argmax(exits == 0)), int(np.argmax(exits == model.n_exits - 1))
        assert exits[first] == 0 and exits[last] == model.n_exits - 1

        def gemms_run(sample: torch.Tensor) -> int:
            session = _session(proto, enable_profiling=True, profile_file_prefix=str(tmp_path / "p"))
            session.run(None, {"x": sample.numpy()})
            with open(session.end_profiling()) as f:
                events = json.load(f)
            return len({e["name"] for e in events
                        if e.get("cat") == "Node" and e.get("args", {}).get("op_name") in ("Gemm", "MatMul")})

        early, late = gemms_run(x[first:first + 1]), gemms_run(x[last:last + 1])
        assert early > 0 and late > early
        # the first stage + head only: the 2 later stages' and heads' Gemms never ran
        assert early <= late // model.n_exits + 1

    def test_compaction_form_drops_exited_samples(self, zoo_model):
        model, _ = zoo_model("early_exit")
        x = _test_inputs("early_exit", 64)
        proto = export_onnx(model, x, "x")
        assert not [n for n in iter_nodes(proto.graph) if n.op_type == "If"]
        assert any(n.op_type == "NonZero" for n in proto.graph.node)  # per-stage selection of survivors
        logits, exit_index = _session(proto).run(None, {"x": x.numpy()})
        want_logits, want_exit = _torch_outputs(model, x)
        np.testing.assert_array_equal(exit_index, want_exit)
        np.testing.assert_allclose(logits, want_logits, atol=ATOL, rtol=0)

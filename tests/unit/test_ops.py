"""Each custom op: numpy reference == torch forward == ONNX function under ORT and the reference evaluator."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx.reference import ReferenceEvaluator

from edgegate.ops import CATALOG, DOMAIN, pack_ternary, reference, unpack_ternary
from edgegate.ops import torch_ops as ops
from edgegate.ops.onnx_function import function_proto


def _cases() -> dict[str, tuple[list[np.ndarray], dict[str, int]]]:
    rng = np.random.default_rng(0)

    def f(*shape, s=1.0):
        return (rng.normal(size=shape) * s).astype(np.float32)

    w = rng.integers(-1, 2, size=(6, 10)).astype(np.int8)
    return {
        "SigmoidGate": ([f(3, 4), f(3, 4)], {}),
        "ThresholdGate": ([f(3, 4), f(4, s=0.3), f(4)], {}),
        "ChannelGate": ([f(2, 3, 4, 4), f(2, 3, 1, 1)], {}),
        "TopKGate": ([f(5, 6), np.zeros(6, np.float32)], {"k": 2}),
        # Qwen3-MoE: no renormalization; DeepSeek-V3: sigmoid scores, a score-correction bias, a scale.
        "TopKGateNoRenorm": ([f(5, 6), np.zeros(6, np.float32)], {"k": 2, "renormalize": 0}),
        "TopKGateSigmoidBias": ([f(5, 6), f(6, s=0.5), ], {"k": 3, "scoring": 1, "renormalize": 1, "scale": 2.5}),
        # MoDES expert skipping: slots with importance * weight < threshold dropped (some, not all, in this data).
        "TopKGateSkip": ([f(64, 6, s=2.0), np.zeros(6, np.float32)],
                         {"k": 3, "skip_importance": 0.8, "skip_threshold": 0.2, "scale": 1.5}),
        "LearnerCount": ([f(64, 5)], {}),
        "ExitDecision": ([f(64, 4, s=3.0), np.array(0.7, np.float32)], {}),
        "LearnedExitDecision": ([f(64), np.array(0.5, np.float32)], {}),
        "TernaryMatMul": ([f(3, 10), pack_ternary(w), rng.random(6).astype(np.float32)], {"in_features": 10}),
        "TernaryMatMulPerTensor": ([f(3, 10), pack_ternary(w), np.array(0.7, np.float32)], {"in_features": 10}),
        "LowRankCorrection": ([f(3, 10), f(2, 10), f(6, 2), np.array(0.3, np.float32)], {}),
    }


CASES = _cases()


def _single_op_model(op_type: str, inputs: list[np.ndarray], attrs: dict, outputs) -> onnx.ModelProto:
    op = CATALOG[op_type]
    to_dtype = helper.np_dtype_to_tensor_dtype
    ins = [helper.make_tensor_value_info(n, to_dtype(x.dtype), x.shape)
           for (n, _), x in zip(op.inputs, inputs, strict=True)]
    outs = [helper.make_tensor_value_info(n, to_dtype(y.dtype), y.shape)
            for (n, _), y in zip(op.outputs, outputs, strict=True)]
    node = helper.make_node(op_type, [n for n, _ in op.inputs], [n for n, _ in op.outputs], domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], op_type, ins, outs)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[function_proto(op_type)])


def test_catalog_covers_the_design_ops():
    assert set(CATALOG) >= {"TopKGate", "ExitDecision", "SigmoidGate", "ThresholdGate", "ChannelGate",
                            "TernaryMatMul", "LowRankCorrection"}
    assert {_op_type(c) for c in CASES} == set(CATALOG)


def _op_type(case: str) -> str:
    """The catalog op a case exercises: cases are named op type + variant (``TopKGateNoRenorm``)."""
    return next(name for name in sorted(CATALOG, key=len, reverse=True) if case.startswith(name))


@pytest.mark.parametrize("op_type", sorted(CASES))
def test_reference_torch_ort_and_onnx_reference_agree(op_type):
    inputs, attrs = CASES[op_type]
    op_type = _op_type(op_type)
    ref = reference(op_type, *inputs, **attrs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got_torch = ops.call(op_type, *[torch.from_numpy(np.array(x)) for x in inputs], **attrs)
    got_torch = got_torch if isinstance(got_torch, tuple) else (got_torch,)

    # Every attribute on the node, as the exporter writes it (the reference evaluator ignores function defaults).
    written = {name: a.value for name, a in CATALOG[op_type].attr_values(attrs).items()}
    model = _single_op_model(op_type, inputs, written, ref)
    onnx.checker.check_model(model, full_check=True)
    feeds = {n: x for (n, _), x in zip(CATALOG[op_type].inputs, inputs, strict=True)}
    got_ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got_ref_eval = ReferenceEvaluator(model).run(None, feeds)

    for r, t, o, e in zip(ref, got_torch, got_ort, got_ref_eval, strict=True):
        assert r.dtype == o.dtype == e.dtype
        assert r.shape == o.shape == tuple(t.shape)
        np.testing.assert_allclose(t.numpy(), r, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(e, r, rtol=1e-5, atol=1e-6)


def test_decision_ops_take_both_outcomes_in_the_test_data():
    # Guards the agreement test against a trivially constant decision.
    for op_type in ("ExitDecision", "LearnedExitDecision"):
        out = reference(op_type, *CASES[op_type][0])
        assert 0 < out.sum() < out.size
    w, _ = reference("TopKGate", *CASES["TopKGateSkip"][0], **CASES["TopKGateSkip"][1])
    assert 0 < (w == 0).sum() < w.size and (w[:, 0] > 0).all()  # some slots skipped; top-1 (>= 1/3) never
    counts = reference("LearnerCount", *CASES["LearnerCount"][0])
    assert counts.dtype == np.int64 and set(counts.tolist()) == {0, 1, 2, 3, 4}


def test_topk_gate_semantics():
    logits = np.array([[0.0, 2.0, 1.0, -1.0]], np.float32)
    zero = np.zeros(4, np.float32)
    w, idx = reference("TopKGate", logits, zero, k=2)
    assert idx.tolist() == [[1, 2]]
    p = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(w, [[p[0, 1] / (p[0, 1] + p[0, 2]), p[0, 2] / (p[0, 1] + p[0, 2])]], rtol=1e-6)
    w, idx = reference("TopKGate", logits, zero, k=2, renormalize=0)  # Qwen3-MoE norm_topk_prob=False
    np.testing.assert_allclose(w, [[p[0, 1], p[0, 2]]], rtol=1e-6)


def test_topk_gate_sigmoid_bias_steers_the_choice_but_not_the_weights():
    logits = np.array([[0.0, 2.0, 1.0, -1.0]], np.float32)
    bias = np.array([0.0, 0.0, 0.0, 5.0], np.float32)  # expert 3 wins by bias alone
    w, idx = reference("TopKGate", logits, bias, k=2, scoring=1, renormalize=0, scale=2.0)
    assert idx.tolist() == [[3, 1]]
    s = 1 / (1 + np.exp(-logits[0]))
    np.testing.assert_allclose(w, [[2.0 * s[3], 2.0 * s[1]]], rtol=1e-6)
    w, _ = reference("TopKGate", logits, bias, k=2, scoring=1, renormalize=1, scale=2.0)
    np.testing.assert_allclose(w, [[2.0 * s[3] / (s[3] + s[1]), 2.0 * s[1] / (s[3] + s[1])]], rtol=1e-6)


def test_topk_gate_skip_drops_slots_below_the_threshold_without_renormalising():
    logits = np.log(np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]], np.float32))  # softmax = these probabilities
    zero = np.zeros(3, np.float32)
    w, idx = reference("TopKGate", logits, zero, k=2)  # renormalised: [2/3, 1/3], [0.533, 0.467]
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3], [0.4 / 0.75, 0.35 / 0.75]], rtol=1e-5)
    # importance 0.9: 0.9 * 1/3 = 0.3 < 0.35 is dropped (weight 0, the kept 2/3 stays 2/3); 0.9 * 0.467 = 0.42 stays.
    ws, idx_s = reference("TopKGate", logits, zero, k=2, skip_importance=0.9, skip_threshold=0.35, scale=2.0)
    np.testing.assert_array_equal(idx_s, idx)
    np.testing.assert_allclose(ws, [[4 / 3, 0.0], [0.8 / 0.75, 0.7 / 0.75]], rtol=1e-5)
    # threshold 0 (the default) keeps every slot
    np.testing.assert_array_equal(reference("TopKGate", logits, zero, k=2, skip_threshold=0.0)[0], w)


def test_learner_count_is_the_first_argmax():
    logits = np.array([[0.0, 2.0, 2.0, 1.0], [3.0, 0.0, 0.0, 3.0], [-1.0, -2.0, -3.0, 5.0]], np.float32)
    np.testing.assert_array_equal(reference("LearnerCount", logits), [1, 0, 3])
    np.testing.assert_array_equal(ops.learner_count(torch.from_numpy(logits)).numpy(), [1, 0, 3])


def test_attributes_left_out_of_a_node_take_the_function_defaults_in_ort():
    # A hand-made TopKGate node with only k: ORT applies the function's attribute defaults (softmax,
    # renormalize, scale 1). onnx.reference does not implement function defaults, which is why the
    # exporter writes every attribute on every node.
    inputs, _ = CASES["TopKGate"]
    want = reference("TopKGate", *inputs, k=2)
    model = _single_op_model("TopKGate", inputs, {"k": 2}, want)
    onnx.checker.check_model(model, full_check=True)
    feeds = {"logits": inputs[0], "bias": inputs[1]}
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])


def test_training_path_is_differentiable_and_matches_the_op():
    x = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4, requires_grad=True)
    y = ops.sigmoid_gate(x, g)
    y.sum().backward()
    assert x.grad is not None and g.grad is not None
    with torch.no_grad():
        np.testing.assert_allclose(ops.sigmoid_gate(x, g).numpy(), y.detach().numpy(), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 23), st.integers(0, 2**31 - 1))
def test_ternary_pack_roundtrip(n, k, seed):
    w = np.random.default_rng(seed).integers(-1, 2, size=(n, k)).astype(np.int8)
    packed = pack_ternary(w)
    assert packed.dtype == np.uint8 and packed.shape == (n, (k + 3) // 4)
    np.testing.assert_array_equal(unpack_ternary(packed, k), w)


def test_pack_ternary_rejects_non_ternary():
    with pytest.raises(ValueError, match="values in"):
        pack_ternary(np.array([[0, 2]]))

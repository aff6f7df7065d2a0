"""Section gated_families: ACM and MoDES expert skipping at batch 64, measured cost vs the ideal cost.

"Ideal" is the same work with the unused parts removed, measured interleaved with the real thing
(``harness``) on the same 16 cycling batches of 64 tokens:

* **ACM** (``edgegate.nn.ACM``, N learners, per-token count k from the gate): *measured* = the ONNX graph
  ``export_onnx`` writes (compaction: per learner NonZero -> Gather -> learner -> ScatterND) on ONNX Runtime
  CPU, 1 thread, fp32. *ideal* = a hand-built ONNX graph with the same gate and learner weights that is
  handed each batch's tokens sorted by k (descending, done before timing) and the row counts n_i: learner
  i runs on the first n_i rows (one Slice), its output padded back and summed; no decision-driven index
  work at all. *dense* = the same hand-built graph with n_i = 64 (every learner on every token), the cost
  without conditional computation. Outputs of measured and ideal are checked equal.
* **MoDES** (``TopKRouter.set_skip``; top-2 of 4 SwiGLU experts, tau chosen so ~30 % of routed slots are
  skipped): *measured* = the MoE's eager sparse dispatch in torch (1 thread), router and skipping
  included; skipped slots carry weight 0 and reach no expert. *ideal* = the routing decision (projection
  and the TopKGate op) plus each expert on exactly its kept (token, slot) rows, precomputed before
  timing, combined with index_add.
  *no skip* = the same sparse MoE with skipping off. Outputs of measured and ideal are checked equal. The
  exported cpu graph of an MoE computes every expert densely on main (a sparse ONNX lowering belongs to
  the sparse-MoE work), so this row times the eager sparse path.

Goal per family: measured / ideal <= 1.15 (``WITHIN``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks.harness import Sizes, batches, goal, ort_session, ratio, time_interleaved
from benchmarks.workspace import Workspace
from edgegate import nn as enn
from edgegate.onnx_export.torch_export import export_onnx
from edgegate.ops import torch_ops as ops

BATCH = 64
WITHIN = 0.15
SEED = 0
# (d_model, d_hidden, n_learners / n_experts): full size makes the learners' work dominate per-op overheads.
ACM_SIZE = {"smoke": (64, 256, 4), "full": (512, 2048, 4)}
MOE_SIZE = {"smoke": (64, 256, 4), "full": (512, 1024, 4)}
SKIP_QUANTILE = 0.3  # ~30 % of routed slots skipped


def _acm_ideal_graph(acm: Any, n_tokens: int) -> bytes:
    """Gate + learner i on the first ``end_i`` rows of pre-sorted tokens, padded back by ``pad_i`` and summed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def w(name: str, t: Any) -> Any:
        return numpy_helper.from_array(t.detach().numpy().astype(np.float32), name)

    def linear(prefix: str, layer: Any, x: str, out: str, nodes: list, inits: list) -> None:
        inits += [w(f"{prefix}.wt", layer.weight.T.contiguous()), w(f"{prefix}.b", layer.bias)]
        nodes += [helper.make_node("MatMul", [x, f"{prefix}.wt"], [f"{out}.mm"]),
                  helper.make_node("Add", [f"{out}.mm", f"{prefix}.b"], [out])]

    d = acm.d_model
    nodes: list = []
    inits: list = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                   numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n_tokens, d])]
    gate = [m for m in acm.gate.modules() if hasattr(m, "weight")]
    linear("gate0", gate[0], "x", "g0", nodes, inits)
    nodes.append(helper.make_node("Relu", ["g0"], ["g0r"]))
    linear("gate1", gate[1], "g0r", "gate_logits", nodes, inits)
    acc = None
    for i, learner in enumerate(acm.learners):
        inputs += [helper.make_tensor_value_info(f"end{i}", TensorProto.INT64, [1]),
                   helper.make_tensor_value_info(f"pad{i}", TensorProto.INT64, [4])]
        nodes.append(helper.make_node("Slice", ["x", "zero", f"end{i}", "axis0"], [f"x{i}"]))
        linear(f"l{i}.0", learner[0], f"x{i}", f"h{i}", nodes, inits)
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"h{i}r"]))
        linear(f"l{i}.2", learner[2], f"h{i}r", f"o{i}", nodes, inits)
        nodes.append(helper.make_node("Pad", [f"o{i}", f"pad{i}"], [f"p{i}"]))
        if acc is None:
            acc = f"p{i}"
        else:
            nodes.append(helper.make_node("Add", [acc, f"p{i}"], [f"s{i}"]))
            acc = f"s{i}"
    nodes.append(helper.make_node("Identity", [acc], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n_tokens, d]),
               helper.make_tensor_value_info("gate_logits", TensorProto.FLOAT, [n_tokens, acm.n_learners + 1])]
    graph = helper.make_graph(nodes, "acm_ideal", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _acm(sizes: Sizes) -> dict[str, Any]:
    d, hidden, n = ACM_SIZE["smoke" if sizes.smoke else "full"]
    torch.manual_seed(SEED)
    acm = enn.ACM(d, n, hidden, gate_hidden=64, act="relu").eval()
    rng = np.random.default_rng(SEED)
    feeds = batches(rng.normal(size=(BATCH * 16, d)).astype(np.float32), BATCH)
    measured = ort_session(export_onnx(_Counted(acm).eval(), torch.from_numpy(feeds[0]), "x").SerializeToString(), 1)
    ideal = ort_session(_acm_ideal_graph(acm, BATCH), 1)
    ideal_feeds, dense_feeds, ks = [], [], []
    for x in feeds:
        y, k = measured.run(None, {"x": x})
        order = np.argsort(-k, kind="stable")  # nested counts: learner i's rows are a prefix once sorted
        rows = [int((k > i).sum()) for i in range(n)]
        feed = {"x": x[order], **{f"end{i}": np.array([r], np.int64) for i, r in enumerate(rows)},
                **{f"pad{i}": np.array([0, 0, BATCH - r, 0], np.int64) for i, r in enumerate(rows)}}
        y_ideal = np.empty_like(y)
        y_ideal[order] = ideal.run(["y"], feed)[0]
        if not np.allclose(y_ideal, y, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"ACM ideal graph disagrees with the export: max |diff| {np.abs(y_ideal - y).max()}")
        ideal_feeds.append(feed)
        dense_feeds.append({"x": x, **{f"end{i}": np.array([BATCH], np.int64) for i in range(n)},
                            **{f"pad{i}": np.zeros(4, np.int64) for i in range(n)}})
        ks.append(k)
    state = {"i": 0}

    def cycle(run):
        def call():
            i = state["i"] = (state["i"] + 1) % len(feeds)
            return run(i)
        return call

    t = time_interleaved({"measured": cycle(lambda i: measured.run(None, {"x": feeds[i]})),
                          "ideal": cycle(lambda i: ideal.run(None, ideal_feeds[i])),
                          "dense": cycle(lambda i: ideal.run(None, dense_feeds[i]))}, sizes)
    k = np.concatenate(ks)
    return {"family": "acm", "what": f"ACM d_model {d}, {n} learners of hidden {hidden}, fp32 ONNX Runtime",
            "batch": BATCH, "used_fraction": round(float(k.mean()) / n, 4),
            "k_histogram": [round(float(v), 4) for v in np.bincount(k, minlength=n + 1) / len(k)],
            "measured_ms": round(t["measured"].median_ms, 4), "ideal_ms": round(t["ideal"].median_ms, 4),
            "all_ms": round(t["dense"].median_ms, 4), "measured_over_ideal": ratio(t["measured"], t["ideal"]),
            "all_over_measured": ratio(t["dense"], t["measured"]),
            "timings": {name: v.to_dict() for name, v in t.items()}}


class _Counted(torch.nn.Module):
    """An ACM as a module returning ``(y, k)``: the export's two outputs."""

    output_names = ("y", "learner_count")

    def __init__(self, acm: enn.ACM) -> None:
        super().__init__()
        self.acm = acm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.acm.forward_counted(x)


def _moe(sizes: Sizes) -> dict[str, Any]:
    d, hidden, n = MOE_SIZE["smoke" if sizes.smoke else "full"]
    torch.manual_seed(SEED)
    moe = enn.MoE(d, hidden, n, 2).eval()
    rng = np.random.default_rng(SEED)
    feeds = [torch.from_numpy(x) for x in batches(rng.normal(size=(BATCH * 16, d)).astype(np.float32), BATCH)]
    router = moe.router
    with torch.no_grad():
        weights = torch.cat([router(x)[0] for x in feeds])
    tau = float(torch.quantile(weights.flatten(), SKIP_QUANTILE))
    plans = []
    with torch.no_grad():
        for x in feeds:
            router.set_skip(1.0, tau)
            y, routed = moe.forward_routed(x)
            w, _ = router(x)
            plan = []
            for e in range(n):
                tok, slot = torch.nonzero(routed == e, as_tuple=True)
                plan.append((tok, w[tok, slot].unsqueeze(-1)))
            y_ideal = _moe_ideal(moe, x, plan)
            if not torch.allclose(y, y_ideal, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"MoE ideal disagrees with the sparse dispatch: {float((y - y_ideal).abs().max())}")
            plans.append((plan, float((routed < 0).float().mean())))
    state = {"i": 0}

    def cycle(run):
        def call():
            i = state["i"] = (state["i"] + 1) % len(feeds)
            with torch.no_grad():
                return run(i)
        return call

    def skipping(on: bool):
        def run(i: int):
            router.set_skip(1.0, tau if on else 0.0)
            return moe.forward_routed(feeds[i])
        return run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = time_interleaved({"measured": cycle(skipping(True)),
                              "ideal": cycle(lambda i: _moe_ideal(moe, feeds[i], plans[i][0])),
                              "no_skip": cycle(skipping(False))}, sizes)
    finally:
        torch.set_num_threads(threads)
        router.set_skip(1.0, 0.0)
    return {"family": "modes", "what": f"MoE top-2 of {n} SwiGLU experts, d_model {d}, hidden {hidden}, torch eager "
            "sparse dispatch", "batch": BATCH, "tau": round(tau, 5),
            "used_fraction": round(1 - float(np.mean([s for _, s in plans])), 4),
            "measured_ms": round(t["measured"].median_ms, 4), "ideal_ms": round(t["ideal"].median_ms, 4),
            "all_ms": round(t["no_skip"].median_ms, 4), "measured_over_ideal": ratio(t["measured"], t["ideal"]),
            "all_over_measured": ratio(t["no_skip"], t["measured"]),
            "timings": {name: v.to_dict() for name, v in t.items()}}


def _moe_ideal(moe: Any, x: Any, plan: list) -> Any:
    """The routing decision (projection and top-k gate: paid either way) + each expert on exactly its kept rows."""
    r = moe.router
    ops.topk_gate(r.proj(x), r.k, r.score_bias, r.scoring, r.renormalize, r.scale, r.skip_importance,
                  r.skip_threshold)
    y = x.new_zeros(x.shape)
    for e, (tok, w) in enumerate(plan):
        if tok.numel():
            y.index_add_(0, tok, w * moe.experts[e](x[tok]))
    return y


def run(ws: Workspace, sizes: Sizes) -> dict[str, Any]:
    rows, errors, goals = [], [], []
    for family, fn in (("acm", _acm), ("modes", _moe)):
        try:
            row = fn(sizes)
        except Exception as e:
            errors.append({"model": family, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
            continue
        rows.append(row)
        r = row["measured_over_ideal"]
        goals.append(goal(f"{family} (batch {BATCH}): unused {'learners' if family == 'acm' else 'slots'} not "
                          f"computed, within {WITHIN:.0%} of ideal", f"measured / ideal <= {1 + WITHIN}", r,
                          None if r is None else r <= 1 + WITHIN,
                          f"{row['used_fraction']:.0%} of the work used; {row['all_over_measured']}x faster than "
                          "computing all of it"))
    return {"method": __doc__.split("\n\n", 1)[1].strip(), "models": rows, "errors": errors, "goals": goals}

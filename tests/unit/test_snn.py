"""edgegate.snn: the emulator against a scalar reading of the spec and snnTorch, the compiler on
hand-built graphs, core image / stream / NIR formats and their error messages, the target's options."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegate.errors import EdgegateError, ModelFormatError, TargetError
from edgegate.snn import emulator
from edgegate.snn.image import assemble, read_image, split_image, write_image
from edgegate.snn.network import INT32_MAX, INT32_MIN, NO_DECAY, Encoder, ExitPolicy, Group, Network, SynapseFormat
from edgegate.snn.stream import (
    Cmd,
    encode_frame,
    image_from_stream,
    input_frames,
    parse_frames,
    program_stream,
    read_input_frames,
)
from edgegate.targets import Artifact, CompileContext
from edgegate.targets.snn import SnnOptions, SnnTarget

IO = {"input_name": "x", "input_shape": [5], "output_names": ["logits"], "exit_index": 0}


def _random_network(rng: np.random.Generator, sizes=(5, 6, 3), frac_bits: int = 2, leaky: bool = True,
                    fmts=(SynapseFormat.DENSE, SynapseFormat.TERNARY, SynapseFormat.CSR)) -> Network:
    groups, fan_in = [], sizes[0]
    for k, n in enumerate(sizes[1:]):
        fmt = fmts[k % len(fmts)]
        w = rng.integers(-1, 2, (n, fan_in)) if fmt is SynapseFormat.TERNARY else rng.integers(-127, 128, (n, fan_in))
        if fmt is SynapseFormat.CSR:
            w = w * (rng.random((n, fan_in)) < 0.3)
        shifts = (0, 1, 3, NO_DECAY) if leaky else (0,)
        groups.append(Group(
            name=f"g{k}", weight=w.astype(np.int8), bias=rng.integers(-300, 300, n).astype(np.int32),
            threshold=rng.integers(50, 900, n).astype(np.int32), v_init=rng.integers(-100, 400, n).astype(np.int32),
            enable=rng.random(n) < 0.9, fmt=fmt, k_syn=int(rng.choice(shifts)),
            k_mem=int(rng.choice(shifts)) if leaky else NO_DECAY, refractory=int(rng.integers(0, 3)) if leaky else 0,
            scale=float(rng.uniform(0.5, 3))))
        fan_in = n
    return Network(Encoder(features=sizes[0], scale=1.0), tuple(groups), frac_bits=frac_bits, timesteps=16)


def _scalar_reference(net: Network, spikes_in: np.ndarray) -> list[np.ndarray]:
    """The neuron model of docs/snn.md, one sample, one neuron at a time, with Python ints."""

    def rnd(x: int, k: int) -> int:
        return 0 if k == NO_DECAY else x if k == 0 else (x + (1 << (k - 1))) >> k

    def sat(x: int) -> int:
        return min(max(x, INT32_MIN), INT32_MAX)

    steps, batch, _ = spikes_in.shape
    trains = [np.zeros((steps, batch, g.size), bool) for g in net.groups]
    for b in range(batch):
        state = [([0] * g.size, [int(v) for v in g.v_init], [False] * g.size, [0] * g.size) for g in net.groups]
        for t in range(steps):
            s = [bool(v) for v in spikes_in[t, b]]
            for k, g in enumerate(net.groups):
                i, m, z, ref = state[k]
                new = []
                for n in range(g.size):
                    drive = sum(int(g.weight[n, j]) for j in range(g.fan_in) if s[j]) << net.frac_bits
                    i[n] = sat(i[n] - rnd(i[n], g.k_syn) + drive + int(g.bias[n]))
                    m[n] = sat(m[n] - rnd(m[n], g.k_mem) + i[n] - int(z[n]) * int(g.threshold[n]))
                    z[n] = m[n] > int(g.threshold[n]) and bool(g.enable[n]) and ref[n] == 0
                    ref[n] = g.refractory if z[n] else max(ref[n] - 1, 0)
                    new.append(z[n])
                trains[k][t, b] = new
                s = new
    return trains


@pytest.mark.parametrize("seed", range(4))
def test_emulator_matches_the_scalar_spec(seed):
    rng = np.random.default_rng(seed)
    net = _random_network(rng)
    spikes = rng.random((16, 3, 5)) < 0.4
    got = emulator.simulate(net, spikes, record=True)
    want = _scalar_reference(net, spikes)
    for g, w in zip(net.groups, want, strict=True):
        np.testing.assert_array_equal(got.trains[g.name], w, err_msg=g.name)
    assert got.trains["g0"].any() and got.spikes["input"] == int(spikes.sum())
    np.testing.assert_array_equal(got.counts, want[-1].sum(0))


def test_emulator_saturates_instead_of_wrapping():
    w = np.full((1, 1), 127, np.int8)
    g = Group("g", w, np.array([INT32_MAX], np.int32), np.array([INT32_MAX - 1], np.int32),
              np.array([0], np.int32), np.ones(1, bool), k_mem=NO_DECAY)
    net = Network(Encoder(1, 1.0), (g,), frac_bits=16, timesteps=4)
    r = emulator.simulate(net, np.ones((4, 1, 1), bool), record=True)
    assert r.membrane[0, 0] == INT32_MAX  # i and m pin at the int32 maximum: no wrap to negative
    assert r.trains["g"][:, 0, 0].all()


def test_emulator_batch_does_not_change_results_and_early_decision_stops():
    rng = np.random.default_rng(7)
    net = _random_network(rng, sizes=(5, 8, 4), leaky=False)
    x = rng.random((6, 5)).astype(np.float32)
    policy = ExitPolicy(True, margin=3, min_steps=4)
    whole = emulator.run(net, x, 64, exit=policy)
    for b in range(6):
        one = emulator.run(net, x[b:b + 1], 64, exit=policy)
        np.testing.assert_array_equal(one.counts[0], whole.counts[b])
        assert one.steps[0] == whole.steps[b]
    stopped = whole.steps < 64
    assert stopped.any()
    top = np.sort(whole.counts, axis=1)
    assert ((top[:, -1] - top[:, -2])[stopped] >= 3).all() and (whole.steps >= 4).all()
    full = emulator.run(net, x, 64)
    assert sum(full.neuron_updates.values()) == 6 * 64 * 12
    assert sum(whole.neuron_updates.values()) == int(whole.steps.sum()) * 12


def test_encoder_rates_follow_the_input():
    net = Network(Encoder(3, 2.0, signed=True), (Group("g", np.zeros((1, 6), np.int8), np.zeros(1, np.int32),
                                                         np.ones(1, np.int32), np.zeros(1, np.int32),
                                                         np.ones(1, bool)),), timesteps=100)
    r = emulator.run(net, np.array([[2.0, 0.5, -1.0]], np.float32), 100, record=True)
    rates = r.trains["input"][:, 0].mean(0)
    np.testing.assert_allclose(rates, [1.0, 0.25, 0.0, 0.0, 0.0, 0.5], atol=0.011)


def test_emulator_spike_trains_equal_snntorch_leaky_subtract():
    torch = pytest.importorskip("torch")
    snn = pytest.importorskip("snntorch")
    rng = np.random.default_rng(3)
    sizes, groups, fan_in = (6, 10, 4), [], 6
    for k, n in enumerate(sizes[1:]):
        groups.append(Group(f"g{k}", rng.integers(-60, 100, (n, fan_in)).astype(np.int8),
                            rng.integers(-20, 40, n).astype(np.int32), np.full(n, 150, np.int32),
                            np.zeros(n, np.int32), np.ones(n, bool)))
        fan_in = n
    net = Network(Encoder(6, 1.0), tuple(groups), frac_bits=0, timesteps=40)
    spikes = rng.random((40, 5, 6)) < 0.5
    ours = emulator.simulate(net, spikes, record=True)
    fcs = [torch.nn.Linear(g.fan_in, g.size) for g in groups]
    lifs = [snn.Leaky(beta=1.0, threshold=150.0, reset_mechanism="subtract") for _ in groups]
    with torch.no_grad():
        for fc, g in zip(fcs, groups, strict=True):
            fc.weight.copy_(torch.from_numpy(g.weight.astype(np.float32)))
            fc.bias.copy_(torch.from_numpy(g.bias.astype(np.float32)))
        mems = [torch.zeros(5, g.size) for g in groups]
        for t in range(40):
            s = torch.from_numpy(spikes[t].astype(np.float32))
            for k, (fc, lif) in enumerate(zip(fcs, lifs, strict=True)):
                s, mems[k] = lif(fc(s), mems[k])
                np.testing.assert_array_equal(s.numpy().astype(bool), ours.trains[f"g{k}"][t], err_msg=f"t={t} g{k}")


def _assert_same_result(want: emulator.SimResult, got: emulator.SimResult) -> None:
    for field in ("counts", "membrane", "last_spike", "steps"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        assert getattr(got, field).dtype == getattr(want, field).dtype, field
    assert (got.spikes, got.synops, got.neuron_updates) == (want.spikes, want.synops, want.neuron_updates)
    assert (got.trains is None) == (want.trains is None)
    for name, train in (want.trains or {}).items():
        assert got.trains[name].shape == train.shape, name
        np.testing.assert_array_equal(got.trains[name], train, err_msg=name)


@pytest.mark.parametrize("ort", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_layer_major_equals_step_by_step(seed, ort, monkeypatch):
    """Leaks, refractory periods, disabled neurons, early decision, blocks of any length: bit-identical."""
    from edgegate.snn import layered, product

    monkeypatch.setattr(product, "ORT_MIN_MACS", 0 if ort else 1 << 62)
    rng = np.random.default_rng(seed)
    net = _random_network(rng, sizes=(5, int(rng.integers(3, 12)), int(rng.integers(1, 5))), leaky=seed % 4 != 0,
                          frac_bits=int(rng.integers(0, 9)))
    policy = ExitPolicy(seed % 2 == 0, margin=int(rng.integers(0, 4)), min_steps=int(rng.integers(0, 12)))
    x = (rng.random((6, 5)) * 2 - 0.5).astype(np.float32)
    spikes = rng.random((40, 6, 5)) < 0.4
    for block in (1, 45, 1 << 23):  # rows x neurons per block: 1 step, a few steps, everything at once
        monkeypatch.setattr(layered, "BLOCK_ELEMENTS", block)
        for record in (False, True):
            _assert_same_result(emulator.run(net, x, 40, exit=policy, record=record, method="steps"),
                                emulator.run(net, x, 40, exit=policy, record=record))
            _assert_same_result(emulator.simulate(net, spikes, exit=policy, record=record, method="steps"),
                                emulator.simulate(net, spikes, exit=policy, record=record))
    if policy.enabled:
        assert emulator.run(net, x, 40, exit=policy).steps.min() < 40 or policy.min_steps > 0


@pytest.mark.parametrize("early", [False, True])
def test_layer_major_counts_wide_groups_and_stops_samples_mid_block(early, monkeypatch):
    """Groups of 8k neurons and > 255 rows take the packed spike counter; decided samples leave mid-block."""
    from edgegate.snn import layered

    rng = np.random.default_rng(11)
    net = _random_network(rng, sizes=(16, 24, 8), leaky=False, frac_bits=8)
    policy = ExitPolicy(early, margin=2, min_steps=5)
    spikes = rng.random((60, 20, 16)) < 0.3
    want = emulator.simulate(net, spikes, exit=policy, record=True, method="steps")
    monkeypatch.setattr(layered, "_step", None)  # no leak, no saturation: the int32 loop alone must run
    got = emulator.simulate(net, spikes, exit=policy, record=True)
    _assert_same_result(want, got)
    if early:
        assert 5 <= want.steps.min() < want.steps.max()  # samples stop at different steps, inside blocks
    else:
        assert (want.steps == 60).all() and want.spikes["g0"] > 255


def test_layer_major_saturates_like_the_spec():
    w = np.full((2, 1), 127, np.int8)
    g = Group("g", w, np.array([INT32_MAX, -(2**30)], np.int32), np.array([INT32_MAX - 1, 5], np.int32),
              np.array([0, INT32_MIN], np.int32), np.ones(2, bool))
    net = Network(Encoder(1, 1.0), (g,), frac_bits=16, timesteps=6)
    spikes = np.ones((6, 3, 1), bool)
    want = emulator.simulate(net, spikes, record=True, method="steps")
    _assert_same_result(want, emulator.simulate(net, spikes, record=True))
    assert want.membrane[0, 0] == INT32_MAX and want.membrane[0, 1] == INT32_MIN


def test_integer_product_model_and_exactness():
    """The hand-written MatMulInteger model is valid ONNX; both products give W @ s exactly."""
    from edgegate.snn.product import IntegerProduct, _ort_session, matmul_integer_model

    assert _ort_session() is not None  # onnxruntime is a base dependency: its product must be in use
    model = onnx.load_from_string(matmul_integer_model())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["MatMulInteger"]
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.UINT8, TensorProto.INT8]
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.INT32
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (37, 300)).astype(np.int8)
    w[0] = -128  # the extremes: a full row of -128 and of 127 against all-ones spikes
    w[1] = 127
    s = rng.random((50, 300)) < 0.5
    s[0] = True
    want = s.astype(np.int64) @ w.T.astype(np.int64)
    for use_ort in (False, True):
        got = IntegerProduct(w, use_ort)(s)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    assert want[0, 0] == -128 * 300 and want[0, 1] == 127 * 300


def test_emulator_method_is_checked():
    net = _random_network(np.random.default_rng(0))
    with pytest.raises(TargetError, match="method 'fast' must be one of layers, steps"):
        emulator.simulate(net, np.zeros((4, 1, 5), bool), method="fast")


# ------------------------------------------------------------------------------------------ formats


def test_image_round_trips_and_stream_is_byte_identical():
    net = _random_network(np.random.default_rng(1))
    image = write_image(net, IO)
    back = read_image(image)
    assert back.io == IO and back.network.timesteps == net.timesteps
    for a, b in zip(net.groups, back.network.groups, strict=True):
        assert a.fmt == b.fmt and (a.k_syn, a.k_mem, a.refractory) == (b.k_syn, b.k_mem, b.refractory)
        for f in ("weight", "bias", "threshold", "v_init", "enable"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{a.name}.{f}")
    assert write_image(back.network, back.io) == image
    stream = program_stream(image)
    frames = parse_frames(stream)
    assert [f.cmd for f in frames[:2]] == [Cmd.RESET, Cmd.BEGIN] and frames[-1].cmd is Cmd.COMMIT
    assert image_from_stream(stream) == image


def _rebuilt(image: bytes, version: int = 1, patch=None) -> bytes:
    parts = split_image(image)
    if patch:
        parts = patch(parts)
    return assemble(parts, version)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:10], "shorter than the 16-byte header"),
    (lambda b: b[:-3], "truncated or padded"),
    (lambda b: b"XXXX" + b[4:], "not an edgegate core image"),
    (lambda b: b[:40] + bytes([b[40] ^ 0xFF]) + b[41:], "CRC32 mismatch"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "section 8 (EXIT 0) CRC32 mismatch"),
    (lambda b: _rebuilt(b, version=2), "core image version 2, this edgegate reads version 1"),
    (lambda b: _rebuilt(b, patch=lambda p: p[:2] + p[3:]), "cannot hold META"),
    (lambda b: _rebuilt(b, patch=lambda p: [p[0], p[1], p[3], p[2], *p[4:]]), "canonical order"),
    (lambda b: _rebuilt(b, patch=lambda p: [*p[:-1], (p[-1][0], 0, b"\x07" + p[-1][2][1:])]), "enabled flag"),
    (lambda b: _rebuilt(b, patch=lambda p: [*p[:4], (p[4][0], p[4][1], p[4][2][:-1]), *p[5:]]), "SYNAPSE 0"),
])
def test_bad_images_fail_in_one_line(damage, message):
    image = write_image(_random_network(np.random.default_rng(2)), IO)
    with pytest.raises(ModelFormatError, match="core.egc: ") as e:
        read_image(damage(image))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s[:-1], "cut short"),
    (lambda s: s[:5] + bytes([s[5] ^ 0x10]) + s[6:], "CRC-16 mismatch"),
    (lambda s: b"\x00" + s[1:], "not the sync byte"),
    (lambda s: s[:s.rfind(b"\xa5\x03")], "ends COMMIT"),
    (lambda s: s + encode_frame(0x7F), "unknown command 0x7f"),
    (lambda s: s[:6] + encode_frame(Cmd.BEGIN, b"\x02\x00" + s[12:18]) + s[20:], "image version 2"),
])
def test_bad_streams_fail_in_one_line(damage, message):
    stream = program_stream(write_image(_random_network(np.random.default_rng(2)), IO))
    with pytest.raises(ModelFormatError, match="stream.bin: ") as e:
        image_from_stream(damage(stream))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_sample_run_over_the_stream_protocol_matches_the_direct_run():
    import struct

    from edgegate.snn.stream import exit_frame, spike_frame, stats_frame

    rng = np.random.default_rng(4)
    net = _random_network(rng, sizes=(5, 7, 3), leaky=False)
    x = rng.random((1, 5)).astype(np.float32)
    direct = emulator.run(net, x, 24, record=True)
    host = input_frames(direct.trains["input"][:, 0], 24, False)  # what the host sends after programming
    spikes, steps, _ = read_input_frames(host, 5)
    device = emulator.simulate(net, spikes[:, None, :], steps, record=True)
    np.testing.assert_array_equal(device.counts, direct.counts)
    out = net.output.name
    reply = b"".join(spike_frame(t, 1, device.trains[out][t, 0]) for t in range(steps))
    cls = int(device.counts[0].argmax())
    reply += exit_frame(0, steps, cls) + stats_frame(steps, sum(device.spikes.values()),
                                                     sum(device.synops.values()), sum(device.neuron_updates.values()))
    frames = parse_frames(reply)
    assert [f.cmd for f in frames[-2:]] == [Cmd.EXIT, Cmd.STATS] and len(frames) == steps + 2
    got = np.stack([np.unpackbits(np.frombuffer(f.payload[4:], np.uint8), bitorder="little")[:3] for f in frames[:-2]])
    np.testing.assert_array_equal(got.sum(0), device.counts[0])
    assert struct.unpack("<HHH", frames[-2].payload) == (0, 24, cls)
    assert struct.unpack("<IQQQ", frames[-1].payload)[2] == sum(direct.synops.values())


def test_input_frames_round_trip():
    spikes = np.random.default_rng(0).random((12, 11)) < 0.3
    back, steps, early = read_input_frames(input_frames(spikes, 12, True), 11)
    np.testing.assert_array_equal(back, spikes)
    assert (steps, early) == (12, True)


# ------------------------------------------------------------------------------------------ compiler + target


def _graph(nodes, inits, n_in=4, n_out=3, outputs=("logits",)) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", n_out]) for o in outputs],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _mlp(act: str = "Relu") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(8, 4)), "b1": rng.normal(size=8) * 0.1, "w2": rng.normal(size=(3, 8)),
             "b2": rng.normal(size=3) * 0.1}
    return _graph([helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
                   helper.make_node(act, ["h"], ["a"], name="act"),
                   helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2", transB=1)], inits)


def _calibration(n=300) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 4)).astype(np.float32)


def test_compile_load_run_and_metrics(tmp_path):
    import onnxruntime as ort

    target = SnnTarget()
    model = _mlp()
    assert target.check(model) == []
    x = _calibration()
    ctx = CompileContext(input_name="x", output_names=("logits",), calibration=x)
    options = target.options_for_export({"timesteps": "128", "margin": "5", "early_decision": "off"}, ctx)
    art = target.compile(model, options, tmp_path)
    assert set(art.files) == {"model.onnx", "core.egc", "stream.bin", "model.nir"}
    assert art.options["exact"] is False and art.options["early_decision"] == "off" and art.options["margin"] == 5
    with target.load(art) as runner:
        out = runner.run({"x": x})["logits"]
        m = runner.metrics()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.shape == (300, 3) and out.dtype == np.float32
    assert np.mean(out.argmax(1) == want.argmax(1)) >= 0.95  # signed inputs: two encoder neurons per feature
    assert m["samples"] == 300 and m["timesteps"] == 128 and m["timesteps_to_decision"]["mean"] == 128
    assert set(m["spikes_per_layer"]) == {"input", "fc1", "fc2"} and m["synops"] == sum(m["synops_per_layer"].values())
    assert m["neuron_updates"] == 300 * 128 * 11
    assert m["energy_pj"]["total"] == pytest.approx(m["synops"] * 0.03 + m["neuron_updates"] * 0.4)
    assert len(runner.latencies_ms) == 1
    with target.load(art) as r2, pytest.raises(TargetError, match="dtype float64"):
        r2.run({"x": x.astype(np.float64)})


def test_nir_graph_carries_the_integer_network(tmp_path):
    nir = pytest.importorskip("nir")
    target = SnnTarget()
    art = target.compile(_mlp(), SnnOptions(calibration=_calibration()), tmp_path)
    path = tmp_path / "model.nir"
    path.write_bytes(art.files["model.nir"])
    graph = nir.read(path)
    net = read_image(art.files["core.egc"]).network
    assert [type(graph.nodes[k]).__name__ for k in ("fc0", "lif0", "fc1", "lif1")] == ["Affine", "IF", "Affine", "IF"]
    g0 = net.groups[0]
    np.testing.assert_array_equal(graph.nodes["fc0"].weight, g0.weight * 256.0 * g0.enable[:, None])
    np.testing.assert_array_equal(graph.nodes["lif1"].v_threshold, net.groups[1].threshold)
    assert graph.metadata["reset"] == "subtract" and float(graph.metadata["dt"]) == 1.0
    assert int(graph.metadata["frac_bits"]) == 8 and len(graph.metadata["scales"]) == 3


def test_check_names_unsupported_nodes():
    issues = SnnTarget().check(_mlp("Sigmoid"))
    assert [(i.node, i.op_type) for i in issues] == [("act", "Sigmoid")]
    assert "no SNN form" in issues[0].message
    rng = np.random.default_rng(0)
    residual = _graph([helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
                       helper.make_node("Relu", ["h"], ["a"], name="relu"),
                       helper.make_node("Add", ["a", "a"], ["logits"], name="skip")],
                      {"w1": rng.normal(size=(4, 4))}, n_out=4)
    issues = SnnTarget().check(residual)
    assert issues[0].node == "skip" and "residual" in issues[0].message
    with pytest.raises(TargetError, match="snn cannot compile node skip"):
        SnnTarget().compile(residual, SnnOptions(calibration=_calibration()), None)


def test_options_are_checked():
    with pytest.raises(TargetError, match="no option 'beta'"):
        SnnOptions.from_strings({"beta": "1"})
    with pytest.raises(TargetError, match="timesteps='many' must be a int"):
        SnnOptions.from_strings({"timesteps": "many"})
    with pytest.raises(TargetError, match="timesteps=0 must be an int in 1..65535"):
        SnnOptions.from_strings({"timesteps": "0"})
    with pytest.raises(TargetError, match="needs calibration inputs"):
        SnnTarget().compile(_mlp(), None, None)
    with pytest.raises(TargetError, match="no fp16 mode"):
        SnnOptions.from_strings({}, CompileContext(quant="fp16"))
    o = SnnOptions.from_strings({"nir": "false", "early_decision": "on"})
    assert SnnOptions.from_manifest({**o.to_manifest(), "exact": False, "golden_atol": 0.1}) == o


def test_load_refuses_foreign_artifacts():
    with pytest.raises(TargetError, match="has no core.egc"):
        SnnTarget().load(Artifact("cpu", {"model.onnx": b""}, {}))
    art = Artifact("snn", {"core.egc": b"EGCI\x01\x00"}, {})
    with pytest.raises(EdgegateError, match="core.egc: 6 bytes is shorter"):
        SnnTarget().load(art)


def test_network_invariants_are_enforced():
    g = Group("g", np.zeros((2, 3), np.int8), np.zeros(2, np.int32), np.zeros(2, np.int32), np.zeros(2, np.int32),
              np.ones(2, bool))
    with pytest.raises(TargetError, match="thresholds must be > 0"):
        Network(Encoder(3, 1.0), (g,))
    with pytest.raises(TargetError, match="k_mem=40"):
        Network(Encoder(3, 1.0), (dataclasses.replace(g, threshold=np.ones(2, np.int32), k_mem=40),))


def test_neurocorex_spike_events_and_bias_line():
    from edgegate.snn.neurocorex import neurocorex_stream, spike_events

    rng = np.random.default_rng(5)
    net = _random_network(rng, sizes=(4, 6, 3), frac_bits=0, leaky=False, fmts=(SynapseFormat.DENSE,))
    net = dataclasses.replace(net, groups=tuple(dataclasses.replace(g, bias=np.clip(g.bias, -100, 100))
                                                for g in net.groups))
    spikes = np.zeros((5, 4), bool)
    spikes[0, 1] = spikes[3, 2] = True
    events = spike_events(net, spikes)
    # the bias line (input 4) fires every step; dt counts steps since the previous event
    assert events == bytes([0x30, 0, 1, 0, 0, 4, 0, 1, 4, 0, 1, 4, 0, 1, 2, 0, 0, 4, 0, 1, 4, 0]) + b"\xff\xff\xff"
    blob = neurocorex_stream(net)
    ff = np.frombuffer(blob, np.int8, 96 * 96, 96 * 96 + 3).reshape(96, 96)
    lateral = np.frombuffer(blob, np.int8, 96 * 96, 1).reshape(96, 96)
    out, hidden = net.groups[1], net.groups[0]
    np.testing.assert_array_equal(ff[3:9, :4], hidden.weight)  # hidden neurons follow the 3 outputs
    np.testing.assert_array_equal(ff[3:9, 4], hidden.bias)
    np.testing.assert_array_equal(lateral[0:3, 3:9], out.weight)
    with pytest.raises(TargetError, match="k_mem=3"):
        neurocorex_stream(dataclasses.replace(net, groups=(dataclasses.replace(hidden, k_mem=3), out)))


@pytest.mark.parametrize("stride, dilation, pads", [(1, 1, (1, 1, 1, 1)), (2, 1, (0, 1, 1, 0)), (1, 2, (2, 2, 2, 2))])
def test_conv_unrolls_to_the_same_linear_map(stride, dilation, pads):
    import onnxruntime as ort

    from edgegate.snn.graph import read_chain

    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 2, 3, 3))
    node = helper.make_node("Conv", ["x", "k", "b"], ["y"], name="conv", strides=[stride, stride],
                            dilations=[dilation, dilation], pads=list(pads))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 7, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(k.astype(np.float32), "k"),
                           numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    x = rng.normal(size=(4, 2, 7, 6)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    chain = read_chain(model)
    assert chain.issues == []
    got = chain.forward(x)[-1]
    np.testing.assert_allclose(got, want.reshape(4, -1), atol=1e-4)


def test_runtime_side_needs_numpy_only(tmp_path):
    import subprocess
    import sys

    art = SnnTarget().compile(_mlp(), SnnOptions(calibration=_calibration(), nir=False), tmp_path)
    (tmp_path / "core.egc").write_bytes(art.files["core.egc"])
    code = (
        "import sys, numpy as np\n"
        "from edgegate.targets import Artifact, get\n"
        f"art = Artifact('snn', {{'core.egc': open({str(tmp_path / 'core.egc')!r}, 'rb').read()}}, {{}})\n"
        "with get('snn').load(art) as r:\n"
        "    out = r.run({'x': np.ones((2, 4), np.float32)})\n"
        "    assert out['logits'].shape == (2, 3) and r.metrics()['samples'] == 2\n"
        "print(sorted(m for m in ('torch', 'onnx', 'nir') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_batch1_if_export_is_refused_with_a_hint():
    rng = np.random.default_rng(0)
    branch = helper.make_graph([helper.make_node("Identity", ["h"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["c"], ["logits"], name="exit0", then_branch=branch, else_branch=branch)]
    issues = SnnTarget().check(_graph(nodes, {"w1": rng.normal(size=(3, 4))}))
    assert [(i.node, i.op_type) for i in issues] == [("exit0", "If")]
    assert "leave out --batch" in issues[0].hint


def test_image_io_must_fit_the_network():
    net = _random_network(np.random.default_rng(2))
    for io in ({**IO, "input_shape": [4]}, {**IO, "output_names": []}, {**IO, "input_name": 3},
               {k: v for k, v in IO.items() if k != "input_shape"}):
        with pytest.raises(ModelFormatError, match="META io"):
            read_image(write_image(net, io))

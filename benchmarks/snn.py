"""Section 4, SNN: edgegate's integer LIF emulator vs snnTorch on the same network, steps and batch.

Networks: the zoo ``threshold_gate`` MLP compiled by the snn target's compiler (threshold balancing
on its calibration split; ``edgegate.snn.graph.read_chain`` + ``compile_network``), and a wider
network of seeded random int8 weights (1024-1024-1024-10) where compute dominates. Both sides get
the *same* input spike trains [T, B, n_in] (for the zoo net: the emulator's own rate encoder on
test digits; for the wide net: Bernoulli spikes at rate 0.1) and run the same T steps:

* edgegate: ``edgegate.snn.emulator.simulate`` (layer-major blocks: exact int8 products through
  onnxruntime MatMulInteger, int32 state where no saturation is possible),
* snnTorch: per layer ``nn.Linear`` (float32, the int8 weights, no bias) then one ``snntorch.Leaky``
  (beta = 1, reset_mechanism="subtract", per-neuron thresholds), its current
  ``(W s) * 2**frac_bits + bias`` and its state in float64 so integers stay exact, membranes
  starting at the network's ``v_init``; a disabled neuron's spikes are masked out.

This matches the emulator's neuron when the synaptic current has no memory (k_syn = 0), the
membrane no leak (k_mem = no decay) and there is no refractory period: the section checks that and
refuses otherwise. Spike-train equality is checked for every layer and step (untimed runs with
recording). Timing: both at 1 thread (numpy BLAS via threadpoolctl, ``torch.set_num_threads``),
interleaved, median of repeats; one call = T steps of a batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.harness import Sizes, goal, ratio, time_interleaved
from benchmarks.workspace import Workspace

SPEEDUP_GOAL = 10.0
WIDE = (1024, 1024, 1024, 10)


def _snntorch_net(net):
    """The network as a list of (Linear, Leaky, bias, scale, v_init, enable) for a step-by-step loop."""
    import snntorch
    import torch

    from edgegate.snn.network import NO_DECAY

    layers = []
    for g in net.groups:
        if g.k_syn != 0 or g.k_mem != NO_DECAY or g.refractory:
            raise ValueError(f"group {g.name} has k_syn={g.k_syn}, k_mem={g.k_mem}, refractory={g.refractory}: "
                             "snntorch.Leaky with beta=1 models only k_syn=0, no membrane decay, no refractory")
        lin = torch.nn.Linear(g.fan_in, g.size, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(g.weight.astype(np.float32)))
        leaky = snntorch.Leaky(beta=1.0, threshold=torch.from_numpy(g.threshold.astype(np.float64)),
                               reset_mechanism="subtract")
        layers.append((lin, leaky, torch.from_numpy(g.bias.astype(np.float64)), float(2 ** net.frac_bits),
                       torch.from_numpy(g.v_init.astype(np.float64)), torch.from_numpy(g.enable)))
    return layers


def _snntorch_run(layers, spikes_in, record: bool):
    """T steps of the snnTorch network: output spike counts, and every layer's trains when ``record``."""
    import torch

    x = torch.from_numpy(spikes_in.astype(np.float32))
    t_steps, batch = x.shape[0], x.shape[1]
    with torch.inference_mode():
        mems = [v.expand(batch, -1).clone() for *_, v, _ in layers]
        counts = torch.zeros(batch, layers[-1][0].out_features, dtype=torch.float64)
        trains = [[] for _ in layers]
        for t in range(t_steps):
            s = x[t]
            for k, (lin, leaky, bias, scale, _, enable) in enumerate(layers):
                cur = lin(s).double() * scale + bias
                spk, mems[k] = leaky(cur, mems[k])
                s = (spk * enable).float()
                if record:
                    trains[k].append(s.bool().numpy())
            counts += s
    return counts.numpy(), ([np.stack(tr) for tr in trains] if record else None)


def _wide_network(timesteps: int, sizes: tuple[int, ...]):
    from edgegate.snn.network import Encoder, Group, Network

    rng = np.random.default_rng(0)
    groups = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = rng.integers(-16, 17, size=(n_out, n_in)).astype(np.int8)
        theta = np.full(n_out, 64 << 8, np.int32)
        groups.append(Group(name=f"fc{k}", weight=w, bias=rng.integers(-256, 257, n_out).astype(np.int32),
                            threshold=theta, v_init=theta // 2, enable=np.ones(n_out, bool)))
    return Network(encoder=Encoder(features=sizes[0], scale=1.0), groups=tuple(groups), frac_bits=8,
                   timesteps=timesteps, meta={"weights": "seeded random int8"})


def _zoo_network(ws: Workspace, name: str, timesteps: int, batch: int):
    import onnx

    from edgegate.snn.compiler import BalanceConfig, compile_network
    from edgegate.snn.emulator import run as emulate
    from edgegate.snn.graph import read_chain

    export = ws.export(name, "fp32")
    calib, test, _, dtype = ws.dataset(name)
    chain = read_chain(onnx.load(str(export.path / "model.onnx")))
    net = compile_network(chain, calib.input().astype(dtype), BalanceConfig(timesteps=timesteps))
    x = test.input().astype(dtype)[:batch]
    spikes_in = emulate(net, x, timesteps, record=True).trains["input"]  # the encoder's trains on real digits
    return net, spikes_in


def _compare(label: str, net, spikes_in: np.ndarray, sizes: Sizes) -> dict[str, Any]:
    import torch
    from threadpoolctl import threadpool_limits

    from edgegate.snn.emulator import simulate

    layers = _snntorch_net(net)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            ours = simulate(net, spikes_in, record=True)
            counts, trains = _snntorch_run(layers, spikes_in, record=True)
            equal, mismatched, total = True, 0, 0
            for g, theirs in zip(net.groups, trains, strict=True):
                mine = ours.trains[g.name]
                mismatched += int(np.count_nonzero(mine != theirs))
                total += mine.size
                equal &= bool(np.array_equal(mine, theirs))
            t = time_interleaved({"emulator": lambda: simulate(net, spikes_in),
                                  "snntorch": lambda: _snntorch_run(layers, spikes_in, record=False)},
                                 sizes, inner=1)
    finally:
        torch.set_num_threads(old)
    return {"network": label, "layers": [g.size for g in net.groups], "timesteps": int(spikes_in.shape[0]),
            "batch": int(spikes_in.shape[1]), "emulator_ms": round(t["emulator"].median_ms, 3),
            "snntorch_ms": round(t["snntorch"].median_ms, 3), "speedup": ratio(t["snntorch"], t["emulator"]),
            "spikes_equal": equal, "spike_mismatch_fraction": round(mismatched / max(total, 1), 6),
            "output_counts_equal": bool(np.array_equal(ours.counts, counts.astype(np.int64))),
            "total_spikes": int(sum(ours.spikes.values())), "timings": {k: v.to_dict() for k, v in t.items()}}


def default_energy(ws: Workspace, name: str = "threshold_gate") -> dict[str, Any]:
    """The snn target at its default settings (timesteps and early decision chosen from calibration) against
    the old default (128 steps, no early decision): energy per sample, the int8 ANN estimate, test accuracy."""
    import onnx

    from edgegate.targets import CompileContext
    from edgegate.targets.snn import SnnTarget

    target = SnnTarget()
    export = ws.export(name, "fp32")
    calib, test, input_name, dtype = ws.dataset(name)
    proto = onnx.load(str(export.path / "model.onnx"))
    ctx = CompileContext(input_name=input_name, output_names=("logits",), calibration=calib.input().astype(dtype))
    x, y = test.input().astype(dtype), test.labels
    out = {"model": name, "test_rows": int(len(x))}
    for label, options in (("default", {"nir": "false"}),
                           ("t128_no_early", {"timesteps": "128", "early_decision": "off", "nir": "false"})):
        artifact = target.compile(proto, target.options_for_export(options, ctx), ws.root)
        with target.load(artifact) as runner:
            acc = float(np.mean(runner.run({input_name: x})["logits"].argmax(1) == y))
            m = runner.metrics()
        out[label] = {"timesteps": artifact.options["timesteps"], "early_decision": artifact.options["early_decision"],
                      "margin": artifact.options["margin"], "accuracy": round(acc, 4),
                      "energy_pj_per_sample": round(m["energy_pj_per_sample"], 1),
                      "mean_steps": round(m["timesteps_to_decision"]["mean"], 2)}
        out["ann_energy_pj_per_sample"] = round(m["ann_energy_pj_per_sample"], 1)
    return out


def run(ws: Workspace, sizes: Sizes) -> dict[str, Any]:
    try:
        import snntorch  # noqa: F401

        from edgegate.snn.emulator import simulate  # noqa: F401
    except ImportError as e:
        return {"gap": f"cannot import the peer or the emulator ({e}); pip install 'edgegate[bench]'", "rows": [],
                "goals": [goal("SNN emulator >= 10x snnTorch", f">= {SPEEDUP_GOAL}", None, None, "not measured")]}
    timesteps, batch = (32, 16) if sizes.smoke else (128, 64)
    wide = (256, 256, 10) if sizes.smoke else WIDE
    rows, errors, goals = [], [], []
    cases = [("zoo threshold_gate (compiled)", lambda: _zoo_network(ws, "threshold_gate", timesteps, batch)),
             (f"random int8 {'-'.join(map(str, wide))}", lambda: (
                 _wide_network(timesteps, wide),
                 np.random.default_rng(1).random((timesteps, batch, wide[0])) < 0.1))]
    for label, make in cases:
        try:
            net, spikes_in = make()
            row = _compare(label, net, spikes_in, sizes)
        except Exception as e:
            errors.append({"model": label, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
            continue
        rows.append(row)
        goals.append(goal(f"SNN {label}: >= {SPEEDUP_GOAL:.0f}x snnTorch", f">= {SPEEDUP_GOAL}", row["speedup"],
                          row["speedup"] >= SPEEDUP_GOAL, f"T={row['timesteps']}, batch {row['batch']}"))
        goals.append(goal(f"SNN {label}: spike trains equal", "every layer, every step", row["spike_mismatch_fraction"],
                          row["spikes_equal"], f"{row['total_spikes']} spikes"))
    energy = None
    try:
        energy = default_energy(ws)
        d, full, ann = energy["default"], energy["t128_no_early"], energy["ann_energy_pj_per_sample"]
        goals.append(goal("SNN threshold_gate (digits) default: energy/sample < int8 ANN estimate", f"< {ann} pJ",
                          d["energy_pj_per_sample"], d["energy_pj_per_sample"] < ann,
                          f"{d['timesteps']} steps, early decision {d['early_decision']} (margin {d['margin']}), "
                          f"{d['mean_steps']} mean steps; 128 steps without: {full['energy_pj_per_sample']} pJ"))
        loss = round(full["accuracy"] - d["accuracy"], 4)
        goals.append(goal("SNN threshold_gate (digits) default: accuracy loss <= 1 pt vs 128 steps", "<= 0.01", loss,
                          loss <= 0.01, f"{d['accuracy']} vs {full['accuracy']}"))
    except Exception as e:
        errors.append({"model": "threshold_gate energy",
                       "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
    return {"method": __doc__.split("\n\n", 1)[1].strip(), "rows": rows, "errors": errors, "goals": goals,
            "energy": energy}

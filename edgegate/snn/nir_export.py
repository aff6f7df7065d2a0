"""Export a compiled `Network` as a NIR graph (``model.nir``) for simulators and chips that read NIR.

Stage: targets (snn), compile side (needs the ``nir`` package: ``pip install 'edgegate[snn]'``).
Input: a `Network`. Output: a ``nir.NIRGraph`` and its serialized bytes (NIR's HDF5 file).

The graph is ``input -> (Affine -> neuron) per group -> output``, in the network's integer state
units (dt = 1 step): Affine weights are ``W << frac_bits``, biases the per-step constant currents;
the neuron is ``IF`` (no leaks), ``LIF`` (membrane leak only: tau = 2**k_mem steps, r = tau) or
``CubaLIF`` (synaptic leak too). NIR has no reset-by-subtraction, no initial membrane and no
enable bits, so they travel in metadata: the graph's metadata says ``reset: "subtract"`` (with the
previous step's spike, as snnTorch's ``Leaky``), ``dt``, ``frac_bits``, the spike ``scales`` and
the encoder; each neuron node carries ``v_init``. Disabled neurons get zero incoming weights and
bias, so a NIR simulator never fires them either. The input is the encoder's spike trains.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgegate.errors import TargetError
from edgegate.snn.network import NO_DECAY, Network


def to_nir(net: Network):
    """The ``nir.NIRGraph`` of ``net`` (see module doc)."""
    try:
        import nir
    except ImportError as e:
        raise TargetError("writing model.nir needs the nir package: pip install 'edgegate[snn]' "
                          "(or compile with -O nir=false)") from e
    one = float(2**net.frac_bits)
    nodes = {"input": nir.Input(input_type={"input": np.array([net.encoder.neurons])})}
    edges, prev = [], "input"
    for k, g in enumerate(net.groups):
        keep = g.enable.astype(np.float64)
        weight = g.weight.astype(np.float64) * one * keep[:, None]
        bias = g.bias.astype(np.float64) * keep
        theta = g.threshold.astype(np.float64)
        meta = {"name": g.name, "v_init": g.v_init.astype(np.float64), "enable": g.enable.astype(np.int64),
                "k_syn": g.k_syn, "k_mem": g.k_mem, "refractory": g.refractory, "scale": g.scale}
        nodes[f"fc{k}"] = nir.Affine(weight=weight, bias=bias, metadata={"name": g.name})
        n = g.size
        if g.k_syn == 0 and g.k_mem == NO_DECAY:
            neuron = nir.IF(r=np.ones(n), v_threshold=theta, v_reset=np.zeros(n), metadata=meta)
        elif g.k_syn == 0:
            tau = np.full(n, float(2**g.k_mem))
            neuron = nir.LIF(tau=tau, r=tau.copy(), v_leak=np.zeros(n), v_threshold=theta, v_reset=np.zeros(n),
                             metadata=meta)
        else:
            tau_mem = np.full(n, np.inf if g.k_mem == NO_DECAY else float(2**g.k_mem))
            neuron = nir.CubaLIF(tau_syn=np.full(n, float(2**g.k_syn)), tau_mem=tau_mem, r=np.ones(n),
                                 v_leak=np.zeros(n), v_threshold=theta, v_reset=np.zeros(n), metadata=meta)
        nodes[f"lif{k}"] = neuron
        edges += [(prev, f"fc{k}"), (f"fc{k}", f"lif{k}")]
        prev = f"lif{k}"
    nodes["output"] = nir.Output(output_type={"output": np.array([net.output.size])})
    edges.append((prev, "output"))
    e = net.encoder
    metadata = {"dt": 1.0, "reset": "subtract", "reset_uses": "previous step's spike", "spike": "v > v_threshold",
                "frac_bits": net.frac_bits, "state": "int32, saturating", "timesteps": net.timesteps,
                "scales": np.array([e.scale, *(g.scale for g in net.groups)]),
                "encoder": {"features": e.features, "signed": int(e.signed), "levels": e.levels, "scale": e.scale},
                "early_decision": {"enabled": int(net.exit.enabled), "margin": net.exit.margin,
                                   "min_steps": net.exit.min_steps},
                "producer": "edgegate snn target"}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)


def nir_bytes(net: Network) -> bytes:
    """``model.nir``: the graph written by ``nir.write`` (HDF5)."""
    import nir

    graph = to_nir(net)
    with tempfile.TemporaryDirectory(prefix="edgegate-nir-") as tmp:
        path = Path(tmp) / "model.nir"
        nir.write(path, graph)
        return path.read_bytes()

"""Stage 6, target ``snn``: an ONNX Linear/ReLU chain -> an integer LIF network for a neuromorphic core.

compile: ``onnx.ModelProto`` (fp32, int8 QDQ or ternary) + calibration inputs -> `Artifact` with
``model.onnx`` (the source graph, for reference), ``core.egc`` (the core image), ``stream.bin`` (the
UART programming stream), ``model.nir`` (NIR graph) and, with ``-O neurocorex=true``,
``neurocorex.bin``. load: a bundle or artifact -> `SnnRunner`, which runs the numpy emulator (the
definition of the target's semantics, edgegate.snn.emulator) on the core image. The compiler lives
in edgegate.snn; docs/snn.md specifies the neuron model, the formats and the metrics.
Only `compile`/`check` need onnx (and nir); `load` and `SnnRunner` need numpy alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgegate.errors import TargetError
from edgegate.schemes import QuantScheme
from edgegate.snn import emulator
from edgegate.snn.compiler import BalanceConfig, compile_network
from edgegate.snn.graph import read_chain
from edgegate.snn.image import CoreImage, read_image, write_image
from edgegate.snn.metrics import summarize
from edgegate.snn.network import NO_DECAY, ExitPolicy
from edgegate.snn.neurocorex import neurocorex_stream
from edgegate.snn.nir_export import nir_bytes
from edgegate.snn.stream import image_from_stream, program_stream
from edgegate.snn.tune import tune
from edgegate.targets.base import Artifact, BaseRunner, CheckIssue, CompileContext, TargetBase, TensorSpec

if TYPE_CHECKING:
    import onnx

    from edgegate.bundle import Bundle

log = logging.getLogger(__name__)

MODEL_FILE, IMAGE_FILE, STREAM_FILE, NIR_FILE, NEUROCOREX_FILE = (
    "model.onnx", "core.egc", "stream.bin", "model.nir", "neurocorex.bin")
EARLY = ("auto", "on", "off")
MAX_AUTO_TIMESTEPS = 128  # the longest run the calibration search considers (and the reference it keeps to)
ROWS = 512  # calibration rows the search runs on
_RUNTIME_KEYS = ("exact", "golden_atol", "tuning")  # written by compile for the pipeline, not options


@dataclasses.dataclass(frozen=True)
class SnnOptions:
    """Compile options (``-O key=value``, e.g. ``-O timesteps=64``). Recorded in the manifest without the data."""

    timesteps: int | None = None  # None: chosen from calibration (edgegate.snn.tune), at most MAX_AUTO_TIMESTEPS
    early_decision: str = "auto"  # auto: on or off, and its margin, chosen from calibration
    margin: int = 4  # spikes the top output must lead the runner-up by
    min_steps: int = 8
    frac_bits: int = 8
    percentile: float = 99.9
    k_syn: int = 0  # synaptic leak shift; 0 = current is this step's input (what conversion needs)
    k_mem: int = NO_DECAY  # membrane leak shift; 255 = none (integrate-and-fire)
    refractory: int = 0
    nir: bool = True
    neurocorex: bool = False
    calibration: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    io: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, lo, hi in (("timesteps", 1, 65535), ("margin", 0, 65535), ("min_steps", 0, 65535),
                             ("frac_bits", 0, 16), ("k_syn", 0, 255), ("k_mem", 0, 255), ("refractory", 0, 255)):
            v = getattr(self, name)
            if name == "timesteps" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise TargetError(f"snn option {name}={v!r} must be an int in {lo}..{hi}")
        if self.early_decision not in EARLY:
            raise TargetError(f"snn option early_decision={self.early_decision!r} must be one of {', '.join(EARLY)}")
        if not 50.0 <= float(self.percentile) <= 100.0:
            raise TargetError(f"snn option percentile={self.percentile!r} must be in 50..100")

    @classmethod
    def from_strings(cls, user: Mapping[str, str], context: CompileContext | None = None) -> SnnOptions:
        """From ``-O key=value`` strings and the export context (calibration inputs, IO names)."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("calibration", "io")}
        unknown = sorted(set(user) - set(fields))
        if unknown:
            raise TargetError(f"snn takes no option {unknown[0]!r}; options: {', '.join(sorted(fields))}")
        values: dict[str, Any] = {}
        for key, text in user.items():
            kind = int if key == "timesteps" else type(fields[key].default)
            try:
                if kind is bool:
                    if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        raise ValueError(text)
                    values[key] = text.lower() in ("true", "1", "yes", "on")
                else:
                    values[key] = kind(text)
            except ValueError:
                raise TargetError(f"snn option {key}={text!r} must be a {kind.__name__}") from None
        if context is not None:
            if context.quant == QuantScheme.FP16:
                raise TargetError("the snn target has no fp16 mode (its state is integer); export with --quant "
                                  "fp32, int8 or ternary")
            if context.dataset is None:
                log.warning("snn: no calibration dataset (the checkpoint names none and no --calib): thresholds "
                            "are balanced on random inputs; pass --calib for real accuracy")
            values["calibration"] = context.calibration
            values["io"] = {"input_name": context.input_name, "output_names": list(context.output_names)}
        return cls(**values)

    @classmethod
    def from_manifest(cls, options: Mapping[str, Any]) -> SnnOptions:
        known = {f.name for f in dataclasses.fields(cls)} - {"calibration", "io"}
        unknown = sorted(set(options) - known - set(_RUNTIME_KEYS))
        if unknown:
            raise TargetError(f"snn target_options has unknown keys {unknown}; re-export with this edgegate")
        return cls(**{k: v for k, v in options.items() if k in known})

    def to_manifest(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("calibration", "io")}


class SnnTarget(TargetBase):
    name = "snn"
    description = "integer LIF network for a neuromorphic core: core image, UART stream, NIR; numpy emulator"
    options_type = SnnOptions
    needs_calibration = True  # threshold balancing needs representative inputs even for --quant fp32
    # Symmetric int8 (zero point 0, per-channel weights) is the integer form the compiler reads, and the
    # symmetric form keeps ternary layers as edgegate::TernaryMatMul (2-bit codes intact).
    qdq_form = "symmetric"
    golden_on_reference = True  # model.onnx is the graph the compiler read, not what the device runs

    def is_available(self) -> tuple[bool, str]:
        try:
            import nir
        except ImportError:
            return True, "numpy emulator; model.nir needs pip install 'edgegate[snn]' (else -O nir=false)"
        return True, f"numpy emulator; nir {getattr(nir, '__version__', '')}".rstrip()

    def options_for_export(self, user: Mapping[str, str], context: CompileContext) -> SnnOptions:
        return SnnOptions.from_strings(user, context)

    def check(self, model: onnx.ModelProto) -> list[CheckIssue]:
        chain = read_chain(model)
        return chain.issues + _output_issues(model, chain.exits)

    def compile(self, model: onnx.ModelProto, options: SnnOptions | None, workdir: Path) -> Artifact:
        """Read the chain, balance it on the calibration inputs, write image, stream and NIR."""
        options = SnnOptions() if options is None else options
        if not isinstance(options, SnnOptions):
            raise TargetError(f"snn compile options must be SnnOptions, not {type(options).__name__}")
        if options.calibration is None:
            raise TargetError("snn needs calibration inputs for threshold balancing: export with a dataset "
                              "(--calib) or pass SnnOptions(calibration=...)")
        chain = read_chain(model)
        issues = chain.issues + _output_issues(model, chain.exits)
        if issues:
            i = issues[0]
            raise TargetError(f"snn cannot compile node {i.node} ({i.op_type}): {i.message}; {i.hint}")
        calibration = np.asarray(options.calibration, np.float32)
        _verify_chain(model, chain, calibration)
        early = options.early_decision == "on"
        config = BalanceConfig(timesteps=options.timesteps or MAX_AUTO_TIMESTEPS, frac_bits=options.frac_bits,
                               percentile=options.percentile, k_syn=options.k_syn, k_mem=options.k_mem,
                               refractory=options.refractory, exit=ExitPolicy(early, options.margin, options.min_steps))
        net = compile_network(chain, calibration, config)
        tuning = None
        if not options.timesteps or options.early_decision == "auto":
            net, tuning = tune(net, chain.forward(calibration[:ROWS])[-1], calibration,
                               timesteps=options.timesteps or None, early=options.early_decision,
                               margin=options.margin, min_steps=options.min_steps, max_timesteps=MAX_AUTO_TIMESTEPS)
            early = net.exit.enabled
        outputs = [o.name for o in model.graph.output]
        io = {"input_name": chain.input_name, "input_shape": list(calibration.shape[1:]),
              "output_names": list((options.io or {}).get("output_names") or outputs),
              "exit_index": chain.exits}  # the last exit: the SNN runs every stage, it decides early in time
        image = write_image(net, io)
        stream = program_stream(image)
        if image_from_stream(stream) != image:  # the promise the two formats make; cheap to keep honest
            raise TargetError("snn stream does not round-trip to the core image; please report this model")
        files = {MODEL_FILE: model.SerializeToString(), IMAGE_FILE: image, STREAM_FILE: stream}
        if options.nir:
            files[NIR_FILE] = nir_bytes(net)
        if options.neurocorex:
            files[NEUROCOREX_FILE] = neurocorex_stream(net)
        recorded = {**options.to_manifest(), "timesteps": net.timesteps, "early_decision": "on" if early else "off",
                    "margin": net.exit.margin, "exact": False,
                    # one output spike over a whole run: the emulator is deterministic, so bench reproduces
                    # golden outputs exactly; this is the resolution a spiking device is held to
                    "golden_atol": float(net.output.scale / net.timesteps)}
        if tuning is not None:
            recorded["tuning"] = tuning
        return Artifact(target=self.name, files=files, options=recorded)

    def load(self, bundle_or_artifact: Bundle | Artifact | str | os.PathLike[str]) -> SnnRunner:
        """A runner for a bundle (dir or `Bundle`) or an in-memory `Artifact`; numpy only."""
        x = bundle_or_artifact
        if isinstance(x, Artifact):
            data = self.artifact_file(x, IMAGE_FILE)
            SnnOptions.from_manifest(x.options)
            return SnnRunner(read_image(data, IMAGE_FILE))
        bundle = self.bundle_for(x)
        SnnOptions.from_manifest(bundle.target_options)
        path = bundle.file(IMAGE_FILE)
        return SnnRunner(read_image(path.read_bytes(), str(path)))


class SnnRunner(BaseRunner):
    """Runs the emulator on a core image; ``latencies_ms`` per `run`, ``metrics()`` of the last run."""

    target = "snn"
    # How to read `edgegate bench`'s lines for this target (shown with them, kept in the report's "notes").
    bench_notes = {
        "exits": "the SNN runs every stage and decides early in time instead (timesteps_to_decision), "
                 "so every sample reports the last exit",
        "runtime_metrics": "emulator counts of the last timed run (samples = its batch)",
    }

    def __init__(self, image: CoreImage) -> None:
        super().__init__()
        self.network = image.network
        io = image.io
        if not isinstance(io.get("input_name"), str) or not isinstance(io.get("output_names"), list):
            raise TargetError("snn core image META lacks input_name/output_names; re-export the bundle")
        self._io = io
        self.input_specs = (TensorSpec(io["input_name"], (None, *io.get("input_shape", [])), np.dtype(np.float32)),)
        self.output_names = tuple(str(n) for n in io["output_names"])
        self._metrics: dict[str, Any] = {}

    def run_impl(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = arrays[self.input_specs[0].name]
        net = self.network
        with self.timed():
            result = emulator.run(net, x, exit=net.exit)
            logits = emulator.decode(net, result)
        self._metrics = summarize(net, result, net.timesteps)
        out = {self.output_names[0]: logits}
        for name in self.output_names[1:]:  # early-exit models: every sample leaves at the last exit
            out[name] = np.full(x.shape[0], int(self._io.get("exit_index", 0)), np.int64)
        return out

    def metrics(self) -> dict[str, Any]:
        """The last run's metrics (edgegate.snn.metrics.summarize); {} before the first run."""
        return dict(self._metrics)


def _output_issues(model: onnx.ModelProto, exits: int) -> list[CheckIssue]:
    """Outputs beyond the first are allowed only as an early-exit model's exit index."""
    extra = [o.name for o in model.graph.output[1:]]
    if not extra or exits and len(extra) == 1:
        return []
    return [CheckIssue(name, "output", f"graph output {name} has no SNN form (the snn target produces the first "
                       "output, plus the exit index of early-exit models)", "export a model with one output")
            for name in extra]


def _verify_chain(model: onnx.ModelProto, chain, calibration: np.ndarray, rows: int = 256) -> None:
    """The chain's float forward must reproduce onnxruntime on the calibration inputs (guards the reader)."""
    import onnxruntime as ort

    x = np.ascontiguousarray(calibration[:rows])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        outs = session.run(None, {chain.input_name: x})
    except Exception as e:  # ORT's own exception types; one line for the user
        raise TargetError(f"onnxruntime cannot run the model to check the snn compiler: {' '.join(str(e).split())}"
                          ) from e
    want = outs[0].reshape(len(x), -1)
    got = chain.forward(x)[-1]
    keep = np.ones(len(x), bool) if chain.exits == 0 or len(outs) < 2 else outs[1].reshape(-1) == chain.exits
    if not keep.any():
        return  # every calibration sample left early: the last stage is never observed by onnxruntime
    err = float(np.abs(got[keep] - want[keep]).max())
    scale = float(np.abs(want[keep]).max()) or 1.0
    if err > 0.02 * scale + 1e-4:
        raise TargetError(f"snn compiler's reading of the graph differs from onnxruntime by {err:.3g} "
                          f"(output scale {scale:.3g}); please report this model")

"""Stage 6, target ``trt``: an ONNX model -> a TensorRT engine (``engine.plan``) in the bundle.

compile: ``onnx.ModelProto`` (QDQ graph for int8, symmetric int8 with zero point 0; the float graph
otherwise) -> the trt lowering (``lower_trt``: ternary weights through DequantizeLinear, NonZero as
TopK for TensorRT-RTX; ``cast_fp16`` for fp16) -> `check` -> the TensorRT builder (``trt_build``)
-> `Artifact` with ``model.onnx`` (the graph the engine was built from, which ONNX Runtime also runs
for the golden outputs), ``engine.plan``, ``network.json`` (the parsed layers and their types) and
``timing.cache`` where the flavor has one. The manifest's ``target_options.build`` records flavor,
TensorRT version, build flags, profiles and compute capabilities; `load` checks them, and the engine's
sha256, before TensorRT deserializes anything (an engine is executable code: one without edgegate's
build record needs ``trust_model``).

Two flavors behind one adapter (``trt_api``): ``tensorrt`` and TensorRT for RTX (``rtx``), which
builds ahead of time on a machine without a GPU. Running needs an NVIDIA GPU (``trt_runner``).
This module imports neither TensorRT nor onnx at import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgegate import __version__
from edgegate.errors import ExportError, TargetError
from edgegate.schemes import QuantScheme
from edgegate.targets import trt_api as api
from edgegate.targets.base import Artifact, CheckIssue, CompileContext, TargetBase, refusal
from edgegate.targets.trt_runner import TrtRunner, inspect_engine

if TYPE_CHECKING:
    import onnx

    from edgegate.bundle import Bundle

MODEL_FILE, ENGINE_FILE, CACHE_FILE, LAYERS_FILE = "model.onnx", "engine.plan", "timing.cache", "network.json"
PRECISIONS = tuple(QuantScheme)  # a build per export scheme
FP16_GOLDEN_ATOL = 0.01  # floor on |engine - golden| for fp16 engines (fp16 accumulation, other kernels)
_NOT_OPTIONS = ("build", "golden_atol", "exact")  # manifest keys beside the options


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    """Build options, recorded in the manifest as ``target_options`` (with the build record)."""

    flavor: str = "auto"  # auto | tensorrt | rtx (auto: tensorrt when installed, else rtx)
    precision: str = "fp32"  # the export's --quant: fp32 | fp16 | int8 | ternary (weights through int8 DQ)
    fp16: bool = False  # float layers in fp16 (always for precision fp16; int8 + fp16 with -O fp16=true)
    opt_level: int = 3  # builder optimization level 0..5 (0: fastest build)
    workspace_mib: int = 0  # 0: TensorRT's default workspace limit
    min_batch: int = 1  # optimization profile over a dynamic batch (unused for a static --batch)
    opt_batch: int = 1
    max_batch: int = 64
    compute_capabilities: tuple[str, ...] = ()  # rtx: e.g. ("86", "89"); empty: TensorRT-RTX's default set

    def __post_init__(self) -> None:
        if self.flavor != "auto" and self.flavor not in api.FLAVORS:
            raise TargetError(f"trt option flavor={self.flavor!r} must be auto, {', '.join(api.FLAVORS)}")
        if self.precision not in PRECISIONS:
            raise TargetError(f"trt option precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        for key in ("opt_level", "workspace_mib", "min_batch", "opt_batch", "max_batch"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TargetError(f"trt option {key}={v!r} must be an int >= 0")
        if not 0 <= self.opt_level <= 5:
            raise TargetError(f"trt option opt_level={self.opt_level} must be 0..5")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise TargetError(f"trt batch profile must satisfy 1 <= min_batch ({self.min_batch}) <= opt_batch "
                              f"({self.opt_batch}) <= max_batch ({self.max_batch})")
        object.__setattr__(self, "compute_capabilities", tuple(str(c) for c in self.compute_capabilities))

    @classmethod
    def from_manifest(cls, options: Mapping[str, Any]) -> TrtOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known - set(_NOT_OPTIONS))
        if unknown:
            raise TargetError(f"trt target_options has unknown keys {unknown}; re-export with this edgegate")
        return cls(**{k: v for k, v in options.items() if k in known})


def _bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise TargetError(f"trt option {key}={value!r} must be true or false")


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise TargetError(f"trt option {key}={value!r} must be an integer") from None


class TrtTarget(TargetBase):
    name = "trt"
    description = "TensorRT engine (tensorrt or TensorRT for RTX); builds without a GPU with rtx, runs on NVIDIA GPUs"
    options_type = TrtOptions
    qdq_form = "symmetric"  # TensorRT's explicit quantization: int8 Q/DQ with zero point 0
    golden_on_reference = True  # model.onnx is the parsed network; the engine is what runs
    option_aliases = {"runtime": "flavor"}  # -O runtime=rtx: which TensorRT builds, not the quantized form

    # ------------------------------------------------------------------------------------ availability

    def is_available(self) -> tuple[bool, str]:
        """Whether an engine can be *built* here (a TensorRT package is importable)."""
        found = [(n, api.installed(n)) for n in api.AUTO_ORDER]
        ok = [f"{n} {why}" for n, (yes, why) in found if yes]
        if ok:
            return True, "builds with " + ", ".join(ok)
        return False, "no TensorRT package: " + " or ".join(f.install for f in api.FLAVORS.values())

    def can_run(self) -> tuple[bool, str]:
        """Whether an engine can *run* here: a TensorRT package and an NVIDIA GPU with its driver."""
        ok, why = self.is_available()
        if not ok:
            return False, why
        found, reason = api.gpus()
        if not found:
            return False, f"{why}; cannot run engines here: {reason}"
        return True, f"{why}; GPU compute capability {', '.join(found)}"

    def options_for_export(self, user: Mapping[str, str], context: CompileContext) -> TrtOptions:
        user = dict(user)
        kw: dict[str, Any] = {"precision": context.quant}
        if context.quant not in PRECISIONS:
            raise TargetError(f"--quant {context.quant} has no trt build; use one of {', '.join(PRECISIONS)}")
        for key, value in user.items():
            if key == "flavor":
                kw["flavor"] = value
            elif key == "fp16":
                kw["fp16"] = _bool(key, value)
            elif key == "compute_capabilities":
                kw[key] = tuple(c.strip().replace(".", "") for c in value.split(",") if c.strip())
            elif key in ("opt_level", "workspace_mib", "min_batch", "opt_batch", "max_batch"):
                kw[key] = _int(key, value)
            else:
                fields = [f.name for f in dataclasses.fields(TrtOptions) if f.name != "precision"]
                raise TargetError(f"unknown trt option {key!r}; known: {', '.join(fields)}")
        if context.quant == QuantScheme.FP16:
            if kw.get("fp16") is False:
                raise TargetError("--quant fp16 contradicts -O fp16=false; give one")
            kw["fp16"] = True
        if context.batch is not None:
            kw.update(min_batch=context.batch, opt_batch=context.batch, max_batch=context.batch)
        return TrtOptions(**kw)

    # ------------------------------------------------------------------------------------ check + compile

    def lower(self, model: onnx.ModelProto, options: TrtOptions, flavor: str) -> onnx.ModelProto:
        """The graph TensorRT builds: ternary weights and NonZero rewritten, fp16 when asked."""
        # onnx-side passes, loaded on compile: a runtime-only install loads trt bundles without onnx
        from edgegate.onnx_export.passes.cast_fp16 import cast_fp16
        from edgegate.onnx_export.passes.lower_trt import lower_trt

        lowered = lower_trt(model, nonzero=flavor == "rtx")
        return cast_fp16(lowered) if options.fp16 else lowered

    def check(self, model: onnx.ModelProto, flavor: str = "auto") -> list[CheckIssue]:
        """Nodes TensorRT cannot take, from its quantization rules and its real ONNX parser (no build).

        Every node that breaks a quantization rule is listed; of the rest, the first node the parser
        refuses (TensorRT's parser stops there).
        """
        from edgegate.targets import trt_build  # onnx and the TensorRT parser: compile side only

        flavor = api.resolve(flavor)
        try:
            lowered = self.lower(model, TrtOptions(flavor=flavor), flavor)
        except ExportError as e:
            return [CheckIssue("<graph>", "", f"the trt lowering failed: {e}", "see the message")]
        issues = trt_build.static_issues(lowered)
        named = {i.node for i in issues}
        # The parser stops at the first node it cannot take; a node named by a static rule is not repeated.
        return issues + [i for i in trt_build.parse_issues(lowered.SerializeToString(), flavor) if i.node not in named]

    def compile(self, model: onnx.ModelProto, options: TrtOptions | None, workdir: Path) -> Artifact:
        """Lower, check and build; the engine is built once, here, never on the device."""
        import onnx

        from edgegate.targets import trt_build  # onnx and the TensorRT builder: compile side only

        options = TrtOptions() if options is None else options
        if not isinstance(options, TrtOptions):
            raise TargetError(f"trt compile options must be TrtOptions, not {type(options).__name__}")
        if not isinstance(model, onnx.ModelProto):
            raise TargetError(f"trt compile takes an onnx.ModelProto, not {type(model).__name__}")
        flavor = api.resolve(options.flavor)
        options = dataclasses.replace(options, flavor=flavor)
        lowered = self.lower(model, options, flavor)
        issues = trt_build.static_issues(lowered)
        if issues:
            raise TargetError(refusal(self.name, issues))
        try:
            onnx.checker.check_model(lowered, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise TargetError(f"the trt-lowered model fails the ONNX checker: {e}; please report this model") from e
        built = trt_build.build(lowered, options, flavor)
        record = {**built.record, "engine_sha256": hashlib.sha256(built.engine).hexdigest(),
                  "timing_cache": CACHE_FILE if built.timing_cache is not None else None}
        record["edgegate_version"] = __version__
        files = {MODEL_FILE: lowered.SerializeToString(), ENGINE_FILE: built.engine,
                 LAYERS_FILE: (json.dumps({"layers": built.layers}, indent=1) + "\n").encode()}
        if built.timing_cache is not None:
            files[CACHE_FILE] = built.timing_cache
            (workdir / CACHE_FILE).write_bytes(built.timing_cache)  # scratch copy beside the build
        out = {**dataclasses.asdict(options), "build": record}
        if options.fp16:
            out.update(exact=False, golden_atol=FP16_GOLDEN_ATOL)
        elif options.precision == "ternary":
            # Unpacked weights change the summation order: a gate decision at its threshold may flip.
            out["exact"] = False
        return Artifact(target=self.name, files=files, options=out)

    # ------------------------------------------------------------------------------------ load

    def load(self, bundle_or_artifact: Bundle | Artifact | str | os.PathLike[str], *,
             trust_model: bool = False) -> TrtRunner:
        """A runner for a bundle or artifact, after the manifest checks; needs an NVIDIA GPU."""
        engine, options, where = self._engine(bundle_or_artifact)
        flavor = check_engine(engine, options, where, trust_model=trust_model)
        return TrtRunner(engine, flavor, TrtOptions.from_manifest(options), where)

    def _engine(self, x: Any) -> tuple[bytes, dict[str, Any], str]:
        if isinstance(x, Artifact):
            return self.artifact_file(x, ENGINE_FILE), dict(x.options), "the compiled artifact"
        bundle = self.bundle_for(x)
        return bundle.file(ENGINE_FILE).read_bytes(), bundle.target_options, str(bundle.path / ENGINE_FILE)

    def describe(self, bundle: Bundle, *, trust_model: bool = False) -> dict[str, Any]:
        """The build record and engine layers: TensorRT's engine inspector's where the engine runs, else the
        network's as parsed at build time."""
        build = bundle.target_options.get("build") or {}
        info = {k: build.get(k) for k in ("flavor", "trt_version", "compute_capabilities", "flags", "profiles",
                                          "plugins", "engine_bytes", "build_s", "layer_precisions")}
        return {"engine": {**info, **self.layers(bundle, trust_model=trust_model)}}

    def layers(self, bundle: Bundle, *, trust_model: bool = False) -> dict[str, Any]:
        """Engine layers from TensorRT's engine inspector where the engine runs, else the parsed network's."""
        ok, why = self.can_run()
        if ok:
            engine, options, where = self._engine(bundle)
            flavor = check_engine(engine, options, where, trust_model=trust_model)
            return {"source": "engine inspector", "layers": inspect_engine(engine, flavor)}
        data = json.loads(bundle.file(LAYERS_FILE).read_text())
        return {"source": f"network as parsed at build time (the engine inspector needs a GPU: {why})",
                "layers": data.get("layers", [])}


def check_engine(engine: bytes, options: Mapping[str, Any], where: str, *, trust_model: bool = False) -> str:
    """Check the manifest's build record against the engine and this machine; returns the flavor to load with.

    Runs before TensorRT sees the bytes: an engine is executable code, and TensorRT's own errors for a
    mismatch ("magic tag", "version tag") do not say what to do.
    """
    record = options.get("build")
    if not isinstance(record, Mapping) or record.get("builder") != "edgegate":
        if not trust_model:
            raise TargetError(f"{where} was not built by edgegate (no build record in the manifest); an engine is "
                              "executable code: pass --trust-model only if you trust where it came from")
        record = {}
    digest = hashlib.sha256(engine).hexdigest()
    if record and record.get("engine_sha256") != digest and not trust_model:
        raise TargetError(f"{where} is not the engine edgegate built (sha256 {digest[:12]}..., the build record says "
                          f"{str(record.get('engine_sha256'))[:12]}...); re-export, or pass --trust-model")
    flavor = str(record.get("flavor") or options.get("flavor") or "auto")
    flavor = api.resolve(flavor)
    ok, have = api.installed(flavor)
    if not ok:
        raise TargetError(f"{where} was built with TensorRT flavor {flavor}, which is not installed here ({have}); "
                          f"{api.FLAVORS[flavor].install}")
    want = record.get("trt_version")
    if want and want != have:
        raise TargetError(f"{where} was built with {api.FLAVORS[flavor].module} {want}, this machine has {have}; "
                          f"install {want} or re-export the bundle here (engines are tied to the TensorRT version)")
    found, why = api.gpus()
    if not found:
        raise TargetError(f"{where} needs an NVIDIA GPU to run and this machine has none ({why}); the bundle's "
                          "model.onnx runs on CPU with --target cpu")
    ccs = [str(c) for c in record.get("compute_capabilities") or []]
    if ccs and not any(cc in ccs for cc in found):
        raise TargetError(f"{where} was built for compute capability {', '.join(ccs)}, this GPU is "
                          f"{', '.join(found)}; re-export with -O compute_capabilities={found[0]}")
    return flavor

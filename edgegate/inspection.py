"""What is in a model file, an ONNX model or a bundle: gates, op counts, edgegate functions.

Input: a path. Output: a plain dict (rendered by ``edgegate inspect``, or ``--json``). A bundle is
described with the standard library alone (its ONNX op counts when onnx is installed), an ONNX file
needs onnx, a model file or a Hugging Face folder the compile extra (torch; ``hf`` for the folder). A
model is described as ``export`` would see it: the converters that apply and the gates found after them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edgegate import targets
from edgegate.bundle import read_bundle
from edgegate.errors import EdgegateError, ModelFormatError, TargetError, UnsafeModelError
from edgegate.loading.hf import is_hf_folder
from edgegate.targets.trt import check_engine
from edgegate.targets.trt_runner import inspect_engine


def describe(path: str | Path, *, trust_model: bool = False, model_class: str | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise EdgegateError(f"{path}: no such file or directory")
    if is_hf_folder(path):
        return describe_model(path, trust_model=trust_model, model_class=model_class)
    if path.is_dir():
        return describe_bundle(path, trust_model=trust_model)
    with path.open("rb") as f:
        head = f.read(4096)
    if _looks_like_onnx(path, head):
        return {"kind": "onnx", "path": str(path), **describe_onnx(path.read_bytes())}
    if _looks_like_engine(head):
        return describe_engine_file(path, trust_model=trust_model)
    return describe_model(path, trust_model=trust_model, model_class=model_class)


def describe_bundle(path: Path, *, trust_model: bool = False) -> dict:
    bundle = read_bundle(path)
    m = bundle.manifest
    out = {"kind": "bundle", "path": str(path), "target": m.get("target"), "quant": m.get("quant"),
           "source": m.get("source"), "model": m.get("model"), "gates": m.get("gates"), "export": m.get("export"),
           "golden": m.get("golden"), "target_options": m.get("target_options"), "created": m.get("created"),
           "versions": m.get("versions"), "timings_s": m.get("timings_s"), "moe_skip": m.get("moe_skip"),
           "files": {k: v["bytes"] for k, v in m.get("files", {}).items()}}
    if "model.onnx" in bundle.files:
        try:
            out["onnx"] = describe_onnx(bundle.file("model.onnx").read_bytes())
        except ModuleNotFoundError as e:  # a runtime-only device: the manifest still says what matters
            if e.name != "onnx":
                raise
            out["onnx"] = None
            out["onnx_note"] = "ONNX op counts need onnx: pip install 'edgegate[compile]'"
    try:
        target = targets.get(bundle.target)
    except TargetError:  # a plugin's bundle without the plugin: the manifest and graph are still shown
        return out
    return {**out, **(target.describe(bundle, trust_model=trust_model) or {})}


def describe_engine_file(path: Path, *, trust_model: bool) -> dict:
    """A bare engine file: executable code with no build record, so only with --trust-model and a GPU."""
    if not trust_model:
        raise UnsafeModelError(f"{path} is a TensorRT engine that edgegate did not build into a bundle; engines are "
                               "executable code: pass --trust-model only if you trust where it came from")
    engine = path.read_bytes()
    flavor = check_engine(engine, {"flavor": "auto"}, str(path), trust_model=True)
    return {"kind": "engine", "path": str(path), "engine": {"flavor": flavor, "source": "engine inspector",
                                                            "layers": inspect_engine(engine, flavor)}}


def describe_onnx(data: bytes) -> dict:
    """Op counts (subgraphs included), edgegate functions, opsets, inputs and outputs."""
    import onnx  # an ONNX file or a bundle's graph; a runtime-only device shows bundles without it

    from edgegate.onnx_export.passes.attach_functions import iter_nodes  # onnx too: loaded with it

    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise ModelFormatError(f"not a readable ONNX model: {e}") from e
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in iter_nodes(model.graph))

    def io(values) -> list[dict]:
        return [{"name": v.name, "elem_type": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "functions": [f"{f.domain}::{f.name}" for f in model.functions],
            "op_counts": dict(sorted(ops.items())), "nodes": sum(ops.values()),
            "inputs": io(model.graph.input), "outputs": io(model.graph.output)}


def describe_model(path: Path, *, trust_model: bool, model_class: str | None) -> dict:
    """A model file or Hugging Face folder: what it is and what ``export`` would find in it. The converters
    run as in ``export`` (a copy in memory; not checked against the original, which ``export`` does on data)."""
    # torch-side stages: a model file needs the compile extra, a bundle (the runtime side) does not
    from edgegate.convert import convert
    from edgegate.gates import find_gates
    from edgegate.loading import detect_format, load

    fmt = detect_format(path)
    loaded = load(path, trust_model=trust_model, model_class=model_class)
    params = sum(p.numel() for p in loaded.module.parameters())
    conversion = convert(loaded.module)
    return {"kind": "model", "path": str(path), "format": str(fmt), "sha256": loaded.sha256,
            "class": loaded.spec.get("class"), "architecture": _architecture(loaded.spec),
            "config": loaded.spec.get("config"), "meta": loaded.spec.get("meta"), "parameters": params,
            "converters": converter_summary(conversion.converted),
            "unrecognised": list(conversion.unrecognised), "gates": find_gates(conversion.module).to_dict()}


def converter_summary(converted) -> list[dict]:
    """One row per (source class, edgegate class): how many modules it converts and the first path."""
    rows: dict[tuple[str, str], dict] = {}
    for c in converted:
        key = (c.source_class, c.target_class)
        row = rows.setdefault(key, {"source_class": c.source_class, "target_class": c.target_class,
                                    "family": c.family, "modules": 0, "first": c.path})
        row["modules"] += 1
    return list(rows.values())


def _architecture(spec: dict) -> str | None:
    """The Hugging Face model_type (``mixtral``) of a folder, else None."""
    config = spec.get("config")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None


def _looks_like_engine(head: bytes) -> bool:
    # TensorRT-RTX plans open with the tag "vtrt" (checked on its engines); other plans fall through to
    # model detection, which refuses unknown formats.
    return head[:4] == b"vtrt"


def _looks_like_onnx(path: Path, head: bytes) -> bool:
    # By content: an ONNX ModelProto starts with field 1 (ir_version, varint) -> byte 0x08.
    if not head.startswith(b"\x08"):
        return False
    import onnx  # outside the try: without onnx, say which extra reads it rather than guess another format

    try:
        onnx.load_model_from_string(path.read_bytes())
        return True
    except Exception:
        return False


def to_json(info: dict) -> str:
    return json.dumps(info, indent=2, sort_keys=False, default=str)

"""Stage 1, load: a model file on disk -> `LoadedModel` (an ``nn.Module`` in eval mode + provenance).

Input: a path to a PyTorch model file. Output: `LoadedModel` (module, detected format, architecture
spec, sha256 of the file). The format is detected from the file's bytes, never its extension
(DESIGN.md §6). Weights-only formats load by default; formats that run code when loaded (full
pickles, TorchScript, ``torch.export`` .pt2) are refused unless ``trust_model=True``.

`save` writes the edgegate checkpoint: a plain dict that ``torch.load(weights_only=True)`` opens,
holding the state_dict and a JSON spec (class path + constructor config) to rebuild the module.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import logging
import os
import pickle
import re
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgegate.bundle import _umask, sha256_file
from edgegate.errors import ModelFormatError, UnsafeModelError

if TYPE_CHECKING:
    import torch

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10: same behaviour for our use (members are their string values)

    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)


log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edgegate-checkpoint"
CHECKPOINT_VERSION = 1
# torch.save's legacy (non-zip) files start with a pickled LONG1 magic number right after PROTO.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# Refuse absurd safetensors headers before reading them (the format itself caps them at 100 MB).
_SAFETENSORS_MAX_HEADER = 100_000_000
_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*([:.][A-Za-z_]\w*)(\.[A-Za-z_]\w*)*$")


class ModelFormat(StrEnum):
    EDGEGATE_CHECKPOINT = "edgegate-checkpoint"
    STATE_DICT = "state-dict"
    SAFETENSORS = "safetensors"
    FULL_PICKLE = "full-pickle"
    TORCHSCRIPT = "torchscript"
    EXPORTED_PROGRAM = "exported-program"
    ONNX = "onnx"
    UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    module: torch.nn.Module
    format: ModelFormat
    spec: dict[str, Any]
    sha256: str
    path: Path


@dataclasses.dataclass(frozen=True)
class _Probe:
    """What detection learned; `payload` is the weights-only object or safetensors header, reused by load."""

    format: ModelFormat
    payload: Any = None


# ---------------------------------------------------------------------------------------------- save


def save(model: torch.nn.Module, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None) -> None:
    """Write `model` as an edgegate checkpoint; ``type(model)(**model.get_config())`` must rebuild it."""
    path = Path(path)
    cls = type(model)
    get_config = getattr(model, "get_config", None)
    if not callable(get_config):
        raise ModelFormatError(
            f"cannot save {cls.__qualname__} to {path}: it has no get_config(); "
            "add get_config() returning its constructor kwargs"
        )
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        # load() imports the class by path; a class defined in a function or script cannot be imported.
        raise ModelFormatError(
            f"cannot save {cls.__qualname__} to {path}: class defined in {cls.__module__} "
            "cannot be imported by path; move it into an importable module"
        )
    spec = {"class": f"{cls.__module__}:{cls.__qualname__}", "config": get_config()}
    if meta is not None:
        spec["meta"] = meta
    try:
        spec_json = json.dumps(spec, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"cannot save {path}: get_config()/meta is not JSON-serializable ({e})") from e
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "spec": spec_json,
        "state_dict": state_dict,
    }
    _atomic_torch_save(payload, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    tmp = None
    try:
        # Temp file in the same directory so os.replace is an atomic rename on one filesystem.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets normal file rights
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ModelFormatError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# -------------------------------------------------------------------------------------------- detect


def detect_format(path: str | os.PathLike[str]) -> ModelFormat:
    """Return the format of the model file at `path`, judged by content only."""
    return _probe(Path(path)).format


def _probe(path: Path) -> _Probe:
    if not path.is_file():
        raise ModelFormatError(f"model file {path} does not exist or is not a file; check the path")
    size = path.stat().st_size
    if size == 0:
        raise ModelFormatError(f"model file {path} is empty (0 bytes); re-save or re-download it")
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _probe_zip(path)
    if head[0] == 0x80 and len(head) >= 2 and 2 <= head[1] <= 5:
        if head[2:].startswith(_TORCH_LEGACY_MAGIC):
            return _probe_weights_only(path)  # legacy torch.save: weights_only can read it
        return _Probe(ModelFormat.FULL_PICKLE)  # a bare pickle.dump: only a full unpickle reads it
    st = _probe_safetensors(path, head, size)
    if st is not None:
        return st
    # ONNX writers emit ModelProto.ir_version (field 1, varint: tag 0x08) first; protobuf caps at 2 GiB.
    if head[0] == 0x08 and size < 2**31 and _is_onnx(path):
        return _Probe(ModelFormat.ONNX)
    return _Probe(ModelFormat.UNKNOWN)


def _probe_zip(path: Path) -> _Probe:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelFormatError(
            f"model file {path} is a truncated or corrupt zip archive ({e}); re-save or re-download it"
        ) from e
    # torch archives put every member under one top-level folder named after the file.
    rel = {n.split("/", 1)[1] for n in names if "/" in n}
    if "constants.pkl" in rel or any(r.startswith("code/") for r in rel):
        return _Probe(ModelFormat.TORCHSCRIPT)  # checked first: TorchScript also has data.pkl
    if "archive_format" in rel or any(r.endswith("serialized_exported_program.json") for r in rel):
        return _Probe(ModelFormat.EXPORTED_PROGRAM)  # torch.export.save (.pt2), new and old layouts
    if "data.pkl" in rel:
        return _probe_weights_only(path)
    return _Probe(ModelFormat.UNKNOWN)


def _probe_weights_only(path: Path) -> _Probe:
    import torch

    try:
        # A file object, not the path: torch.load picks a loader by the name's extension (.safetensors).
        with path.open("rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The restricted unpickler refused a global: the file pickles code, not just tensors.
        return _Probe(ModelFormat.FULL_PICKLE)
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError for damaged archives
        raise ModelFormatError(f"model file {path} cannot be read ({_one_line(e)}); re-save it") from e
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return _Probe(ModelFormat.EDGEGATE_CHECKPOINT, obj)
    if _as_state_dict(obj) is not None:
        return _Probe(ModelFormat.STATE_DICT, obj)
    raise ModelFormatError(
        f"model file {path} holds a {type(obj).__name__}, not a state_dict or edgegate checkpoint; "
        "save model.state_dict() or use edgegate.save"
    )


def _probe_safetensors(path: Path, head: bytes, size: int) -> _Probe | None:
    """safetensors = u64 little-endian header length, JSON header, raw tensor bytes."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n > _SAFETENSORS_MAX_HEADER:
        return None
    if n > size - 8:
        raise ModelFormatError(f"model file {path} is a truncated safetensors file; re-save or re-download")
    with path.open("rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"model file {path} has a corrupt safetensors header ({e}); re-save it") from e
    if not isinstance(header, dict):
        return None
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
            raise ModelFormatError(f"model file {path}: safetensors entry {name!r} is malformed; re-save it")
        end = max(end, int(entry["data_offsets"][1]))
    if end > size - 8 - n:
        raise ModelFormatError(f"model file {path} is a truncated safetensors file; re-save or re-download")
    meta = header.get("__metadata__") or {}
    if meta.get("format") == CHECKPOINT_FORMAT:
        return _Probe(ModelFormat.EDGEGATE_CHECKPOINT, header)
    return _Probe(ModelFormat.SAFETENSORS, header)


def _is_onnx(path: Path) -> bool:
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:  # compile extra missing: cannot tell, and load() cannot use ONNX anyway
        return False
    try:  # from bytes: onnx.load_model(path) would pick a text format by the file's extension
        model = onnx.load_model_from_string(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError, OSError):
        return False
    # Random bytes sometimes parse as a protobuf with unknown fields; a real model has these.
    return model.ir_version > 0 and model.HasField("graph") and len(model.opset_import) > 0


# ---------------------------------------------------------------------------------------------- load


def load(
    path: str | os.PathLike[str], *, trust_model: bool = False, model_class: str | None = None
) -> LoadedModel:
    """Load the model at `path` safely; see the module docstring for what is accepted by default.

    `model_class` ("pkg.module:Class") names the nn.Module to build for a plain state_dict or
    safetensors file, and allows an edgegate checkpoint whose class lives outside ``edgegate.``.
    """
    path = Path(path)
    probe = _probe(path)
    digest = sha256_file(path)
    module, spec = _LOADERS[probe.format](path, probe, trust_model, model_class)
    if probe.format != ModelFormat.EXPORTED_PROGRAM:  # .pt2 modules refuse eval(); export fixed the mode
        module.eval()
    return LoadedModel(module=module, format=probe.format, spec=spec, sha256=digest, path=path)


def _load_checkpoint(path: Path, probe: _Probe, trust: bool, model_class: str | None):
    payload = probe.payload
    if payload.get("format") == CHECKPOINT_FORMAT:  # the torch.save dict written by save()
        fields, state_dict = payload, _as_state_dict(payload.get("state_dict"))
    else:  # a safetensors header: the spec rides in __metadata__, whose values are strings
        fields, state_dict = payload.get("__metadata__") or {}, _load_safetensors(path)
    version, spec_json = fields.get("version"), fields.get("spec")
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if version != CHECKPOINT_VERSION:
        raise ModelFormatError(
            f"checkpoint {path} has version {version!r}; this edgegate reads version {CHECKPOINT_VERSION} "
            "(upgrade edgegate or re-save it)"
        )
    try:
        spec = json.loads(spec_json) if isinstance(spec_json, str) else None
    except json.JSONDecodeError:
        spec = None
    if not (isinstance(spec, dict) and isinstance(spec.get("class"), str)):
        raise ModelFormatError(f"checkpoint {path} has no valid spec (class, config); re-save it")
    if not isinstance(spec.get("config"), dict):
        raise ModelFormatError(f"checkpoint {path}: spec has no config dict; re-save it with edgegate.save")
    if state_dict is None:
        raise ModelFormatError(f"checkpoint {path} has no state_dict of tensors; re-save with edgegate.save")
    cls_path = spec["class"]
    if model_class is None and not _is_edgegate_class(cls_path):
        raise UnsafeModelError(
            f"checkpoint {path} names class {cls_path} outside edgegate and importing it runs its code; "
            f"pass --model {cls_path} (model_class=...) if you trust it"
        )
    if model_class is not None and _split_class_path(model_class) != _split_class_path(cls_path):
        log.warning("%s: building %s instead of the saved class %s", path, model_class, cls_path)
    cls = _import_module_class(model_class or cls_path, path)
    try:
        module = cls(**spec["config"])
    except TypeError as e:
        raise ModelFormatError(f"checkpoint {path}: config does not fit {cls.__qualname__} ({e})") from e
    _load_state_dict(module, state_dict, path)
    return module, spec


def _load_weights(path: Path, probe: _Probe, trust: bool, model_class: str | None):
    kind = "safetensors file" if probe.format == ModelFormat.SAFETENSORS else "plain state_dict"
    if model_class is None:
        raise ModelFormatError(
            f"model file {path} is a {kind} (weights only, no architecture); "
            "pass --model pkg.module:Class (model_class=...) naming the nn.Module to build"
        )
    if probe.format == ModelFormat.SAFETENSORS:
        state_dict = _load_safetensors(path)
    else:
        state_dict = _as_state_dict(probe.payload)
    cls = _import_module_class(model_class, path)
    try:
        module = cls()
    except TypeError as e:
        raise ModelFormatError(
            f"{model_class} cannot be built without arguments ({e}); save the model with edgegate.save"
        ) from e
    _load_state_dict(module, state_dict, path)
    return module, {"class": model_class, "config": {}}


def _load_code(path: Path, probe: _Probe, trust: bool, model_class: str | None):
    what = {
        ModelFormat.FULL_PICKLE: "a full pickle",
        ModelFormat.TORCHSCRIPT: "a TorchScript archive",
        ModelFormat.EXPORTED_PROGRAM: "a torch.export program (.pt2)",
    }[probe.format]
    if not trust:
        raise UnsafeModelError(
            f"model file {path} is {what}, which runs code when loaded; "
            "pass --trust-model if you trust its source"
        )
    import torch

    try:
        if probe.format == ModelFormat.TORCHSCRIPT:
            module = torch.jit.load(str(path), map_location="cpu")
        elif probe.format == ModelFormat.EXPORTED_PROGRAM:
            module = torch.export.load(str(path)).module()
        else:
            with path.open("rb") as f:
                head = f.read(16)
            with path.open("rb") as f:
                if head[2:].startswith(_TORCH_LEGACY_MAGIC) or head[:2] == b"PK":
                    module = torch.load(f, map_location="cpu", weights_only=False)
                else:
                    module = pickle.load(f)  # the user passed --trust-model
    except Exception as e:
        raise ModelFormatError(f"model file {path} ({what}) failed to load: {_one_line(e)}") from e
    if not isinstance(module, torch.nn.Module):
        raise ModelFormatError(f"model file {path} holds a {type(module).__name__}, not a torch.nn.Module")
    return module, {}


def _refuse(path: Path, probe: _Probe, trust: bool, model_class: str | None):
    if probe.format == ModelFormat.ONNX:
        raise ModelFormatError(
            f"model file {path} is an ONNX model; load() reads PyTorch models: start from the .pt file"
        )
    raise ModelFormatError(
        f"model file {path} is not a format edgegate recognizes (edgegate checkpoint, state_dict, "
        "safetensors, TorchScript, .pt2); check the file"
    )


# Format -> loader; each returns (module, spec). Plain table so a new format is one entry.
_LOADERS: dict[ModelFormat, Callable[[Path, _Probe, bool, str | None], tuple[Any, dict[str, Any]]]] = {
    ModelFormat.EDGEGATE_CHECKPOINT: _load_checkpoint,
    ModelFormat.STATE_DICT: _load_weights,
    ModelFormat.SAFETENSORS: _load_weights,
    ModelFormat.FULL_PICKLE: _load_code,
    ModelFormat.TORCHSCRIPT: _load_code,
    ModelFormat.EXPORTED_PROGRAM: _load_code,
    ModelFormat.ONNX: _refuse,
    ModelFormat.UNKNOWN: _refuse,
}


# ------------------------------------------------------------------------------------------- helpers


def _as_state_dict(obj: Any) -> dict[str, Any] | None:
    """The tensor mapping inside `obj` (itself, or a training checkpoint's "state_dict"), else None."""
    import torch

    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict"):
            inner = obj.get(key)
            if inner is not None and inner is not obj:
                found = _as_state_dict(inner)
                if found is not None:
                    return found
    return None


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ModelFormatError(f"reading {path} needs safetensors; pip install 'edgegate[compile]'") from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises SafetensorError for damaged files
        raise ModelFormatError(f"safetensors file {path} cannot be read ({_one_line(e)}); re-save it") from e


def _load_state_dict(module: Any, state_dict: Mapping[str, Any], path: Path) -> None:
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise ModelFormatError(
            f"weights in {path} do not fit {type(module).__qualname__}: {_one_line(e)}"
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise ModelFormatError(
            f"weights in {path} do not fit {type(module).__qualname__}: missing keys "
            f"{_short(result.missing_keys)}, unexpected keys {_short(result.unexpected_keys)}; "
            "check --model / the saved config"
        )


def _split_class_path(class_path: str) -> tuple[str, str]:
    if not _CLASS_PATH.match(class_path):
        raise ModelFormatError(f"class path {class_path!r} is not of the form 'pkg.module:ClassName'")
    if ":" in class_path:
        mod, qual = class_path.split(":", 1)
    else:
        mod, qual = class_path.rsplit(".", 1)
    return mod, qual


def _is_edgegate_class(class_path: str) -> bool:
    mod, _ = _split_class_path(class_path)
    return mod == "edgegate" or mod.startswith("edgegate.")


def _import_module_class(class_path: str, path: Path) -> type:
    import torch

    mod_name, qual = _split_class_path(class_path)
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelFormatError(
            f"cannot import {class_path} to load {path} ({_one_line(e)}); "
            "check --model and that its package is installed"
        ) from e
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise ModelFormatError(f"{class_path} (needed to load {path}) is not a torch.nn.Module subclass")
    return obj


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _short(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "") + "]"

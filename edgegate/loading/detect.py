"""Model-file format detection, by content only (DESIGN.md §6).

Input: a path (a file, or a Hugging Face model folder: a directory holding ``config.json``). Output: a
`ModelFormat` (and, for weights-only formats, what was read while looking, so `load` does not read the
file twice). Nothing here runs code from the file: pickles are opened
only with torch's restricted ``weights_only`` unpickler, and every malformed input ends in a
`ModelFormatError` naming the file, never in a raw parser exception.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgegate.errors import ModelFormatError, one_line

CHECKPOINT_FORMAT = "edgegate-checkpoint"
CHECKPOINT_VERSION = 1
# torch.save's legacy (non-zip) files start with a pickled LONG1 magic number right after PROTO.
TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# Refuse absurd safetensors headers before reading them (the format itself caps them at 100 MB).
SAFETENSORS_MAX_HEADER = 100_000_000
# torch.save stores archive members uncompressed; a deflated member that claims to grow more than
# this much is a zip bomb, refused before torch's reader inflates it into memory.
ZIP_MAX_RATIO = 100
# ONNX is protobuf, which caps a serialized message at 2 GiB.
ONNX_MAX_BYTES = 2**31


class ModelFormat(StrEnum):
    EDGEGATE_CHECKPOINT = "edgegate-checkpoint"
    STATE_DICT = "state-dict"
    SAFETENSORS = "safetensors"
    FULL_PICKLE = "full-pickle"
    TORCHSCRIPT = "torchscript"
    EXPORTED_PROGRAM = "exported-program"
    ONNX = "onnx"
    HF_FOLDER = "hf-folder"  # config.json + *.safetensors, built by transformers (loading.hf)
    MODULE = "nn-module"  # an nn.Module handed to edgegate.export from Python (no file)
    UNKNOWN = "unknown"


# Formats that execute code from the file when loaded: refused unless the user trusts the file.
CODE_FORMATS = frozenset({ModelFormat.FULL_PICKLE, ModelFormat.TORCHSCRIPT, ModelFormat.EXPORTED_PROGRAM})
# Formats that load but cannot be exported, and why (with what to do instead).
NOT_EXPORTABLE = {
    ModelFormat.TORCHSCRIPT: "it is a TorchScript archive, which has no Python module to trace (--trust-model "
                             "would load it, but edgegate exports through torch.export); export from the original "
                             "nn.Module (edgegate.export(module, example_inputs)) or save its state_dict and pass "
                             "--model pkg.module:Class",
    ModelFormat.EXPORTED_PROGRAM: "it is a torch.export program (.pt2): a flat graph with no modules left, so its "
                                  "gates cannot be found, calibrated or converted (--trust-model would not change "
                                  "that); export from the original nn.Module (edgegate.export(module, "
                                  "example_inputs)) or save its state_dict and pass --model pkg.module:Class",
}


@dataclasses.dataclass(frozen=True)
class Probe:
    """What detection learned; `payload` is the weights-only object or safetensors header, reused by load."""

    format: ModelFormat
    payload: Any = None


def detect_format(path: str | Path) -> ModelFormat:
    """Return the format of the model file at `path`, judged by content only."""
    return probe(Path(path)).format


def probe(path: Path) -> Probe:
    """Detect the format of `path`; raises `ModelFormatError` for missing, empty or damaged files."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return Probe(ModelFormat.HF_FOLDER)
        raise ModelFormatError(f"{path} is a directory without config.json; give a model file, or a Hugging Face "
                               "model folder (config.json + *.safetensors)")
    try:
        if not path.is_file():
            raise ModelFormatError(f"model file {path} does not exist or is not a file; check the path")
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ModelFormatError(f"cannot read model file {path}: {e.strerror or e}; check its permissions") from e
    if size == 0:
        raise ModelFormatError(f"model file {path} is empty (0 bytes); re-save or re-download it")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _probe_zip(path, size)
    if head[0] == 0x80 and len(head) >= 2 and 2 <= head[1] <= 5:
        if head[2:].startswith(TORCH_LEGACY_MAGIC):
            return _probe_weights_only(path)  # legacy torch.save: weights_only can read it
        # A safetensors header of 640..1535 bytes also starts 0x80 0x02..0x05: its length prefix.
        try:
            found = _probe_safetensors(path, head, size)
        except ModelFormatError:
            found = None
        return found or Probe(ModelFormat.FULL_PICKLE)  # a bare pickle.dump: only a full unpickle reads it
    found = _probe_safetensors(path, head, size)
    if found is not None:
        return found
    # ONNX writers emit ModelProto.ir_version (field 1, varint: tag 0x08) first.
    if head[0] == 0x08 and size < ONNX_MAX_BYTES and _is_onnx(path):
        return Probe(ModelFormat.ONNX)
    return Probe(ModelFormat.UNKNOWN)


def check_safetensors(path: Path) -> Probe:
    """The checked header of the safetensors file at `path` (one of a Hugging Face folder's weights);
    anything else there, a pickle named ``.safetensors`` included, is a `ModelFormatError`."""
    found = probe(path)
    if found.format not in (ModelFormat.SAFETENSORS, ModelFormat.EDGEGATE_CHECKPOINT) or not isinstance(
            found.payload, dict) or found.payload.get("format") == CHECKPOINT_FORMAT:
        raise ModelFormatError(f"weights file {path} is not a safetensors file (it holds {found.format}); "
                               "re-save the model with save_pretrained")
    return found


def _probe_zip(path: Path, size: int) -> Probe:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except Exception as e:  # BadZipFile, and struct/Value/NotImplementedError for crafted headers
        raise ModelFormatError(
            f"model file {path} is a truncated or corrupt zip archive ({one_line(e)}); re-save or re-download it"
        ) from e
    names = [i.filename for i in infos]
    # torch archives put every member under one top-level folder named after the file.
    rel = {n.split("/", 1)[1] for n in names if "/" in n}
    if "constants.pkl" in rel or any(r.startswith("code/") for r in rel):
        return Probe(ModelFormat.TORCHSCRIPT)  # checked first: TorchScript also has data.pkl
    if "archive_format" in rel or any(r.endswith("serialized_exported_program.json") for r in rel):
        return Probe(ModelFormat.EXPORTED_PROGRAM)  # torch.export.save (.pt2), new and old layouts
    if "data.pkl" not in rel:
        return Probe(ModelFormat.UNKNOWN)
    for info in infos:
        if info.compress_size > size or info.file_size > max(info.compress_size, 1) * ZIP_MAX_RATIO:
            raise ModelFormatError(
                f"model file {path}: archive member {info.filename!r} claims {info.file_size} bytes from "
                f"{info.compress_size} (a zip bomb?); torch.save writes uncompressed archives, re-save it"
            )
    return _probe_weights_only(path)


def _probe_weights_only(path: Path) -> Probe:
    import torch

    try:
        # A file object, not the path: torch.load picks a loader by the name's extension (.safetensors).
        with path.open("rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The restricted unpickler refused a global or opcode: the file pickles code, not just tensors.
        return Probe(ModelFormat.FULL_PICKLE)
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError/UnicodeDecodeError for damage
        raise ModelFormatError(f"model file {path} cannot be read ({one_line(e)}); re-save it") from e
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return Probe(ModelFormat.EDGEGATE_CHECKPOINT, obj)
    if as_state_dict(obj) is not None:
        return Probe(ModelFormat.STATE_DICT, obj)
    raise ModelFormatError(
        f"model file {path} holds a {type(obj).__name__}, not a state_dict or edgegate checkpoint; "
        "save model.state_dict() or use edgegate.save"
    )


def _probe_safetensors(path: Path, head: bytes, size: int) -> Probe | None:
    """safetensors = u64 little-endian header length, JSON header, raw tensor bytes."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n > SAFETENSORS_MAX_HEADER:
        return None
    if n > size - 8:
        raise ModelFormatError(f"model file {path} is a truncated safetensors file; re-save or re-download it")
    with path.open("rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, over-long ints, absurd nesting
        raise ModelFormatError(
            f"model file {path} has a corrupt safetensors header ({one_line(e, 120)}); re-save it"
        ) from e
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise ModelFormatError(f"model file {path}: safetensors __metadata__ is not a str->str table; re-save it")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        ok = (
            isinstance(entry.get("dtype") if isinstance(entry, dict) else None, str)
            and isinstance(shape, list)
            and all(_is_count(d) for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]
        )
        if not ok:
            raise ModelFormatError(f"model file {path}: safetensors entry {name!r} is malformed; re-save it")
        end = max(end, offsets[1])
    if end > size - 8 - n:
        raise ModelFormatError(f"model file {path} is a truncated safetensors file; re-save or re-download it")
    if (meta or {}).get("format") == CHECKPOINT_FORMAT:
        return Probe(ModelFormat.EDGEGATE_CHECKPOINT, header)
    return Probe(ModelFormat.SAFETENSORS, header)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_onnx(path: Path) -> bool:
    try:
        import onnx
    except ImportError:  # compile extra missing: cannot tell, and load() cannot use ONNX anyway
        return False
    try:  # from bytes: onnx.load_model(path) would pick a text format by the file's extension
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception:  # DecodeError and friends: whatever it is, it is not an ONNX model
        return False
    # Random bytes sometimes parse as a protobuf with unknown fields; a real model has these.
    return model.ir_version > 0 and model.HasField("graph") and len(model.opset_import) > 0


def as_state_dict(obj: Any, depth: int = 0) -> dict[str, Any] | None:
    """The tensor mapping inside `obj` (itself, or a training checkpoint's "state_dict"), else None."""
    import torch

    if isinstance(obj, Mapping) and depth < 4:  # a pickle can nest a dict in itself; look a few levels
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict"):
            inner = obj.get(key)
            if inner is not None and inner is not obj:
                found = as_state_dict(inner, depth + 1)
                if found is not None:
                    return found
    return None

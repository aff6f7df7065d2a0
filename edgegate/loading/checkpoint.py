"""The edgegate checkpoint: write it (`save`) and read back its spec (`read_spec`).

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` opens: format tag, version, the
state_dict and a JSON spec (class path + constructor config + optional meta) to rebuild the module.
The same fields may ride in a safetensors file's ``__metadata__`` (string values).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgegate.errors import ModelFormatError
from edgegate.fs import fsync_dir, umask
from edgegate.loading.detect import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, as_state_dict

if TYPE_CHECKING:
    import torch


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
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; a checkpoint gets normal file rights
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)  # make the rename itself durable
    except OSError as e:
        raise ModelFormatError(
            f"cannot write checkpoint {path}: {e.strerror or e}; check free space and permissions"
        ) from e
    finally:
        # Every exit, KeyboardInterrupt included: no half-written temp file is left behind.
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def read_spec(path: Path, payload: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(spec, state_dict or None) of a checkpoint: a torch.save payload or a safetensors header.

    The safetensors tensors are not in the header; the caller loads them and gets None here.
    """
    if payload.get("format") == CHECKPOINT_FORMAT:  # the torch.save dict written by save()
        fields, state_dict = payload, as_state_dict(payload.get("state_dict"))
    else:  # a safetensors header: the spec rides in __metadata__, whose values are strings
        fields, state_dict = payload.get("__metadata__") or {}, None
    version, spec_json = fields.get("version"), fields.get("spec")
    if isinstance(version, str) and version.isascii() and version.isdigit() and len(version) < 6:
        version = int(version)
    if version != CHECKPOINT_VERSION:
        shown = repr(version) if len(repr(version)) < 40 else repr(version)[:37] + "..."
        raise ModelFormatError(
            f"checkpoint {path} has version {shown}; this edgegate reads version {CHECKPOINT_VERSION} "
            "(upgrade edgegate or re-save it)"
        )
    try:
        spec = json.loads(spec_json) if isinstance(spec_json, str) else None
    except (ValueError, RecursionError):  # bad JSON, over-long ints, absurd nesting
        spec = None
    if not (isinstance(spec, dict) and isinstance(spec.get("class"), str)):
        raise ModelFormatError(f"checkpoint {path} has no valid spec (class, config); re-save it")
    config = spec.get("config")
    if not (isinstance(config, dict) and all(isinstance(k, str) and k.isidentifier() for k in config)):
        raise ModelFormatError(f"checkpoint {path}: spec has no config dict of keyword arguments; re-save it")
    return spec, state_dict

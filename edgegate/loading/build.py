"""Load a detected model file into an ``nn.Module``: one loader per `ModelFormat`.

Weights-only formats rebuild the module from a class path (the checkpoint's own, if it lives in
``edgegate``, else the user's ``--model``) and load the tensors into it; Hugging Face folders are built
by ``transformers`` (``loading.hf``); code-running formats load only with ``trust_model=True``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgegate.bundle import sha256_file
from edgegate.data import TensorSpec
from edgegate.errors import ModelFormatError, UnsafeModelError, one_line
from edgegate.loading import hf
from edgegate.loading.checkpoint import read_spec
from edgegate.loading.detect import (
    CHECKPOINT_FORMAT,
    TORCH_LEGACY_MAGIC,
    ModelFormat,
    Probe,
    as_state_dict,
    probe,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Non-persistent buffers (masks, tables) a config may ask for beyond the stored tensors.
MAX_UNSTORED_BYTES = 1 << 30
_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*([:.][A-Za-z_]\w*)(\.[A-Za-z_]\w*)*$")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    module: torch.nn.Module
    format: ModelFormat
    spec: dict[str, Any]  # class, config, meta (meta.inputs: what the model takes, when recorded)
    sha256: str  # of the file; of a Hugging Face folder, see ``hf.folder_sha256``
    path: Path | None  # None for a module given from Python


def load(
    path: str | os.PathLike[str], *, trust_model: bool = False, model_class: str | None = None,
    inputs: tuple[TensorSpec, ...] = (),
) -> LoadedModel:
    """Load the model at `path` safely; see the package docstring for what is accepted by default.

    `model_class` ("pkg.module:Class") names the nn.Module to build for a plain state_dict or
    safetensors file, and allows an edgegate checkpoint whose class lives outside ``edgegate.``.
    `inputs` (``--input``) name the inputs a Hugging Face folder's module takes (default ``input_ids``).
    """

    path = Path(path)
    found = probe(path)
    if found.format == ModelFormat.HF_FOLDER:
        if model_class is not None:
            raise ModelFormatError(f"{path} is a Hugging Face folder: its config.json names the architecture; "
                                   "leave out --model")
        module, spec = hf.load_folder(path, inputs)
        return LoadedModel(module=module, format=found.format, spec=spec, sha256=_folder_sha256(path), path=path)
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise ModelFormatError(f"cannot read model file {path}: {e.strerror or e}") from e
    module, spec = _LOADERS[found.format](path, found, trust_model, model_class)
    if found.format != ModelFormat.EXPORTED_PROGRAM:  # .pt2 modules refuse eval(); export fixed the mode
        module.eval()
    return LoadedModel(module=module, format=found.format, spec=spec, sha256=digest, path=path)


def _load_checkpoint(path: Path, found: Probe, trust: bool, model_class: str | None):
    spec, state_dict = read_spec(path, found.payload)
    if state_dict is None and found.payload.get("format") != CHECKPOINT_FORMAT:  # safetensors: tensors in the body
        state_dict = _load_safetensors(path)
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
    module = _build(cls, spec["config"], path, state_dict)
    _load_state_dict(module, state_dict, path)
    return module, spec


def _load_weights(path: Path, found: Probe, trust: bool, model_class: str | None):
    kind = "safetensors file" if found.format == ModelFormat.SAFETENSORS else "plain state_dict"
    if model_class is None:
        raise ModelFormatError(
            f"model file {path} is a {kind} (weights only, no architecture); "
            "pass --model pkg.module:Class (model_class=...) naming the nn.Module to build"
        )
    if found.format == ModelFormat.SAFETENSORS:
        state_dict = _load_safetensors(path)
    else:
        state_dict = as_state_dict(found.payload)
    cls = _import_module_class(model_class, path)
    module = _build(cls, {}, path, state_dict)
    _load_state_dict(module, state_dict, path)
    return module, {"class": model_class, "config": {}}


def _load_code(path: Path, found: Probe, trust: bool, model_class: str | None):
    what = {
        ModelFormat.FULL_PICKLE: "a full pickle",
        ModelFormat.TORCHSCRIPT: "a TorchScript archive",
        ModelFormat.EXPORTED_PROGRAM: "a torch.export program (.pt2)",
    }[found.format]
    if not trust:
        raise UnsafeModelError(
            f"model file {path} is {what}, which runs code when loaded; "
            "pass --trust-model if you trust its source"
        )
    import torch

    try:
        if found.format == ModelFormat.TORCHSCRIPT:
            module = torch.jit.load(str(path), map_location="cpu")
        elif found.format == ModelFormat.EXPORTED_PROGRAM:
            module = torch.export.load(str(path)).module()
        else:
            with path.open("rb") as f:
                head = f.read(16)
                f.seek(0)
                if head[2:].startswith(TORCH_LEGACY_MAGIC) or head[:2] == b"PK":
                    module = torch.load(f, map_location="cpu", weights_only=False)
                else:
                    module = pickle.load(f)  # the user passed --trust-model
    except Exception as e:
        raise ModelFormatError(f"model file {path} ({what}) failed to load: {one_line(e)}") from e
    if not isinstance(module, torch.nn.Module):
        raise ModelFormatError(f"model file {path} holds a {type(module).__name__}, not a torch.nn.Module")
    return module, {}


def _refuse(path: Path, found: Probe, trust: bool, model_class: str | None):
    if found.format == ModelFormat.ONNX:
        raise ModelFormatError(
            f"model file {path} is an ONNX model; load() reads PyTorch models: start from the .pt file"
        )
    raise ModelFormatError(
        f"model file {path} is not a format edgegate recognizes (edgegate checkpoint, state_dict, "
        "safetensors, TorchScript, .pt2); check the file"
    )


# Format -> loader; each returns (module, spec). Plain table so a new format is one entry.
_LOADERS: dict[ModelFormat, Callable[[Path, Probe, bool, str | None], tuple[Any, dict[str, Any]]]] = {
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


def _folder_sha256(path: Path) -> str:
    try:
        return hf.folder_sha256(path)
    except OSError as e:
        raise ModelFormatError(f"cannot read model folder {path}: {e.strerror or e}") from e


def _build(cls: type, config: Mapping[str, Any], path: Path, state_dict: Mapping[str, Any]) -> Any:
    """``cls(**config)``, after checking on the meta device that it fits `state_dict`.

    The config comes from the file: sizes in it must not make us allocate gigabytes the file does
    not hold, so the module is first built without memory (``torch.device("meta")``) and its tensor
    shapes compared with the stored ones. A constructor may reject the config with any exception
    (TypeError for unknown keys, ValueError/RuntimeError for bad sizes); each is the file's fault.
    """
    import torch

    try:
        with torch.device("meta"):
            shell = cls(**config)
    except Exception:  # e.g. an __init__ that reads tensor values; the real build below reports errors
        shell = None
    if shell is not None:
        _check_fits(shell, state_dict, path)
    try:
        return cls(**config)
    except Exception as e:
        if not config:
            raise ModelFormatError(
                f"{cls.__qualname__} cannot be built without arguments to load {path} ({one_line(e)}); "
                "save the model with edgegate.save"
            ) from e
        raise ModelFormatError(
            f"checkpoint {path}: config does not fit {cls.__qualname__} ({one_line(e)}); "
            "re-save it with edgegate.save"
        ) from e


def _check_fits(shell: Any, state_dict: Mapping[str, Any], path: Path) -> None:
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or unexpected:
        raise ModelFormatError(
            f"weights in {path} do not fit {type(shell).__qualname__}: missing keys {_short(missing)}, "
            f"unexpected keys {_short(unexpected)}; check --model / the saved config"
        )
    for k in sorted(want):
        if want[k] != got[k]:
            raise ModelFormatError(
                f"weights in {path} do not fit {type(shell).__qualname__}: {k} has shape {list(got[k])} in the "
                f"file, the model builds {list(want[k])}; check --model / the saved config"
            )
    # Buffers outside the state_dict (persistent=False) are sized by the config alone.
    extra = sum(b.numel() * b.element_size() for n, b in shell.named_buffers() if n not in want)
    if extra > MAX_UNSTORED_BYTES:
        raise ModelFormatError(
            f"checkpoint {path}: its config makes {type(shell).__qualname__} allocate {extra >> 20} MiB of "
            "buffers that are not in the file; re-save it with edgegate.save"
        )


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ModelFormatError(f"reading {path} needs safetensors; pip install 'edgegate[compile]'") from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises SafetensorError for damaged files
        raise ModelFormatError(f"safetensors file {path} cannot be read ({one_line(e)}); re-save it") from e


def _load_state_dict(module: Any, state_dict: Mapping[str, Any], path: Path) -> None:
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except Exception as e:  # shape mismatches raise RuntimeError even with strict=False
        raise ModelFormatError(f"weights in {path} do not fit {type(module).__qualname__}: {one_line(e)}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ModelFormatError(
            f"weights in {path} do not fit {type(module).__qualname__}: missing keys "
            f"{_short(result.missing_keys)}, unexpected keys {_short(result.unexpected_keys)}; "
            "check --model / the saved config"
        )


def _split_class_path(class_path: str) -> tuple[str, str]:
    if not _CLASS_PATH.fullmatch(class_path) or not class_path.isascii():  # fullmatch: "$" allows a final "\n"
        shown = class_path if len(class_path) <= 80 else class_path[:77] + "..."
        raise ModelFormatError(f"class path {shown!r} is not of the form 'pkg.module:ClassName'")
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
            f"cannot import {class_path} to load {path} ({one_line(e)}); "
            "check --model and that its package is installed"
        ) from e
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise ModelFormatError(f"{class_path} (needed to load {path}) is not a torch.nn.Module subclass")
    return obj


def _short(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "") + "]"

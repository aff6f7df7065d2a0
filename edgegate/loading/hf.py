"""Hugging Face model folders: ``config.json`` + ``*.safetensors`` -> an ``nn.Module`` built by ``transformers``.

Stage: load (DESIGN.md §6, §10). Input: a directory. Output: a module that takes the model's inputs
positionally (default ``input_ids`` of `DEFAULT_SEQ_LEN` tokens) and returns its logits, plus the spec
recorded in the manifest (architecture, config, inputs). Safe by default: the folder is data, never code.
Refused, each in one line: a config that needs remote code (``auto_map``, a ``model_type`` the installed
``transformers`` does not know), an architecture ``transformers`` does not ship, pickled weights only
(``*.bin``), damaged safetensors, a config whose parameters the files do not hold, missing weights.
``transformers`` is imported only here, when a folder is loaded (never by ``import edgegate``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgegate.data import TensorSpec
from edgegate.errors import EdgegateError, ModelFormatError, UnsafeModelError, one_line
from edgegate.loading.detect import check_safetensors

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CONFIG_MAX_BYTES = 4 << 20  # real configs are a few KB
DEFAULT_SEQ_LEN = 32  # tokens per sample when --input does not say
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# The model's parameters (elements) may exceed the elements stored in its safetensors files by this
# factor (packed 2-bit weights hold 4 per byte) plus slack; beyond it the config asks for memory the
# folder does not hold, and it is refused before anything is allocated.
MAX_PARAM_RATIO, PARAM_SLACK = 4, 1 << 20
# Experts as batched matmuls: the fused 3-D expert weights export to ONNX (transformers' default,
# grouped_mm, is a custom op with no ONNX translation; eager loops over the experts a batch hits).
EXPERTS_IMPLEMENTATION = "batched_mm"
HF_EXTRA = "pip install 'edgegate[hf]'"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def folder_files(path: Path) -> list[Path]:
    """The files that define the model, sorted by name: config.json, *.safetensors, the shard index."""
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    return sorted([path / CONFIG_FILE, *weights], key=lambda p: p.name)


def folder_sha256(path: Path) -> str:
    """sha256 of the lines ``"<sha256 of file>  <file name>\\n"`` over `folder_files` (sorted by name):
    the folder's identity, like ``sha256sum config.json *.safetensors | sha256sum`` after sorting."""
    lines = "".join(f"{_sha256(f)}  {f.name}\n" for f in folder_files(path))
    return hashlib.sha256(lines.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, or a `ModelFormatError` naming the file."""
    file = path / CONFIG_FILE
    try:
        if file.stat().st_size > CONFIG_MAX_BYTES:
            raise ModelFormatError(f"{file} is over {CONFIG_MAX_BYTES >> 20} MiB; a model config is a few KB")
        config = json.loads(file.read_bytes())
    except OSError as e:
        raise ModelFormatError(f"cannot read {file}: {e.strerror or e}; check its permissions") from e
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{file} is not valid JSON ({one_line(e, 120)}); re-save the model") from e
    if not isinstance(config, dict):
        raise ModelFormatError(f"{file} holds a JSON {type(config).__name__}, not an object; re-save the model")
    return config


def check_folder(path: Path, config: Mapping[str, Any]) -> str:
    """The architecture class name to build, after the checks that need no ``transformers``."""
    if "auto_map" in config:
        raise UnsafeModelError(f"{path} needs remote code (config.json has auto_map): edgegate never runs a "
                               "model folder's own Python; use an architecture that ships in transformers")
    archs = config.get("architectures")
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) and a.isidentifier() for a in archs)):
        raise ModelFormatError(f"{path / CONFIG_FILE} names no architecture (\"architectures\": [\"...\"]); "
                               "re-save the model with save_pretrained")
    if not any(path.glob("*.safetensors")):
        pickled = sorted({p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern)})
        if pickled:
            raise UnsafeModelError(f"{path} holds only pickled weights ({', '.join(pickled[:3])}), which run code "
                                   "when loaded; convert them to safetensors (save_pretrained(..., "
                                   "safe_serialization=True)) where you trust them")
        raise ModelFormatError(f"{path} has config.json but no *.safetensors weights; add the model's weights")
    return archs[0]


def load_folder(path: Path, inputs: Sequence[TensorSpec] = ()) -> tuple[Any, dict[str, Any]]:
    """(module, spec) of the Hugging Face folder at `path`; `inputs` (from ``--input``) replace the default."""
    config_dict = read_config(path)
    arch = check_folder(path, config_dict)
    # Our own header checks before transformers reads a byte of the weights.
    headers = [check_safetensors(f).payload for f in sorted(path.glob("*.safetensors"))]
    transformers = _transformers()
    # transformers (and torch) are imported only once a folder is loaded: `import edgegate` stays light.
    import torch
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from edgegate.loading.hf_bitnet import is_bitnet, load_bitnet  # torch side, like hf_module

    model_type = config_dict.get("model_type")

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UnsafeModelError(f"{path}: model_type {str(model_type)[:40]!r} is not in transformers "
                               f"{transformers.__version__}, so it would need remote code; upgrade transformers "
                               "if a newer release ships it")
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelFormatError(f"{path}: architecture {arch} is not in transformers {transformers.__version__}; "
                               "upgrade transformers or re-save the model with an architecture it ships")
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises ValueError/OSError/TypeError for bad configs
            raise ModelFormatError(f"{path / CONFIG_FILE} does not load as a {model_type} config "
                                   f"({one_line(e, 200)}); re-save the model") from e
        _check_size(path, cls, config, headers)
        try:
            if is_bitnet(config):  # from_pretrained's BitNet quantizer insists on accelerate, unused on CPU
                model, info = load_bitnet(path, cls, config)
            else:
                model, info = cls.from_pretrained(
                    path, config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                    dtype=torch.float32, experts_implementation=EXPERTS_IMPLEMENTATION, output_loading_info=True)
        except EdgegateError:
            raise
        except Exception as e:
            raise ModelFormatError(f"{path} does not load as {arch} ({one_line(e, 200)}); check the folder") from e
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        what = f"missing weights {missing[:3]}" if missing else f"weights of another shape {mismatched[:3]}"
        raise ModelFormatError(f"{path}: {arch} has {what} in its safetensors files; the folder is incomplete "
                               "or its config does not match its weights")
    model.eval()
    model.config.use_cache = False
    specs = tuple(inputs) or default_inputs(model, path)
    from edgegate.loading.hf_module import HFLogits  # torch-side class: loading/ imports without torch

    module = HFLogits(model, [s.name for s in specs])
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    spec = {"class": f"transformers:{arch}", "config": config_dict,
            "meta": {"inputs": [_input_record(s, vocab) for s in specs], "transformers": transformers.__version__,
                     **({"vocab_size": int(vocab)} if isinstance(vocab, int) else {})}}
    return module, spec


def default_inputs(model: Any, path: Path) -> tuple[TensorSpec, ...]:
    """``input_ids`` of `DEFAULT_SEQ_LEN` tokens (fewer if the model's positions end sooner), or an image
    of the config's size; anything else needs ``--input``."""
    name = getattr(model, "main_input_name", "input_ids")
    config = model.config
    if name == "input_ids":
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        seq = min(DEFAULT_SEQ_LEN, limit) if isinstance(limit, int) and limit > 0 else DEFAULT_SEQ_LEN
        return (TensorSpec("input_ids", (seq,), "int64"),)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if name == "pixel_values" and isinstance(size, int) and isinstance(channels, int):
        return (TensorSpec("pixel_values", (channels, size, size), "float32"),)
    raise ModelFormatError(f"{path}: {type(model).__name__} takes {name}, whose shape edgegate cannot guess; "
                           f"pass --input {name}:1xSHAPE[:DTYPE]")


def _input_record(spec: TensorSpec, vocab: Any) -> dict[str, Any]:
    record = spec.to_dict()
    if spec.name == "attention_mask":
        record["range"] = [1, 2]  # sample masks attend to every token
    elif spec.dtype.startswith("int") and isinstance(vocab, int):
        record["range"] = [0, vocab]
    return record


def _check_size(path: Path, cls: type, config: Any, headers: Sequence[Mapping[str, Any]]) -> None:
    """Build `cls` on the meta device (no memory) and refuse a config whose parameters the files do not hold."""
    import torch  # torch side: loading/ itself imports without torch

    stored = sum(math.prod(e["shape"]) for h in headers for k, e in h.items() if k != "__metadata__")
    try:
        with torch.device("meta"):
            shell = cls(config)
    except Exception as e:
        raise ModelFormatError(f"{path}: {cls.__name__} cannot be built from config.json ({one_line(e, 200)}); "
                               "re-save the model") from e
    params = sum(p.numel() for p in shell.parameters())
    if params > MAX_PARAM_RATIO * stored + PARAM_SLACK:
        raise ModelFormatError(f"{path}: config.json makes {cls.__name__} with {params} parameters, but its "
                               f"safetensors files hold {stored} values; the config does not match the weights")


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars or loading reports from transformers while loading (library code never prints; what
    the reports say, missing or mismatched weights, is checked and raised here); restored after."""
    tlog = transformers.utils.logging
    had_bar, verbosity = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    if not log.isEnabledFor(logging.DEBUG):
        tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if had_bar:
            tlog.enable_progress_bar()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        if e.name == "transformers":
            raise ModelFormatError(f"loading a Hugging Face model folder needs transformers: {HF_EXTRA}") from e
        raise ModelFormatError(f"transformers is installed but does not import ({one_line(e, 160)}); "
                               f"reinstall it: {HF_EXTRA}") from e
    return transformers

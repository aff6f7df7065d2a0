"""Stage 1, load: a model file on disk -> `LoadedModel` (an ``nn.Module`` in eval mode + provenance).

Input: a path to a PyTorch model file. Output: `LoadedModel` (module, detected format, architecture
spec, sha256 of the file). A model file is a program: the format is detected from the file's bytes,
never its extension (DESIGN.md §6, SECURITY.md). Weights-only formats load by default (edgegate
checkpoints, state_dicts read by torch's ``weights_only`` unpickler, safetensors); formats that run
code when loaded (full pickles, TorchScript, ``torch.export`` .pt2) are refused unless
``trust_model=True``. Any damaged or hostile file ends in an `EdgegateError` naming the file.

Hugging Face model folders (``config.json`` + ``*.safetensors``) are built by ``transformers`` from the
architecture their config names, never with remote code (``hf``).

Parts: `detect` (format by content), `checkpoint` (the edgegate checkpoint: `save`, its spec),
`build` (one loader per format: rebuild the module, load its tensors), `hf` (Hugging Face folders),
`inputs` (what a model takes: recorded in its file or given as ``--input NAME:SHAPE[:DTYPE]``),
`source` (what an export starts from: a path, or an ``nn.Module`` with example inputs; imports torch).
"""

from __future__ import annotations

from edgegate.loading.build import LoadedModel, load
from edgegate.loading.checkpoint import save
from edgegate.loading.detect import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CODE_FORMATS,
    NOT_EXPORTABLE,
    ModelFormat,
    detect_format,
)
from edgegate.loading.inputs import model_inputs, parse_input, parse_inputs

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CODE_FORMATS",
    "NOT_EXPORTABLE",
    "LoadedModel",
    "ModelFormat",
    "detect_format",
    "load",
    "model_inputs",
    "parse_input",
    "parse_inputs",
    "save",
]

"""Fuzz the model-file loader: `detect_format` and `load` on mutated checkpoints, pickles, safetensors, ONNX.

Whatever the bytes, loading without ``--trust-model`` must return a model or raise an EdgegateError,
and must never execute code from the file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from _fuzz import FUZZ, expect_edgegate_error, framed, mutated
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save

from edgegate import zoo
from edgegate.errors import EdgegateError, UnsafeModelError
from edgegate.loading import CODE_FORMATS, ModelFormat, detect_format, load
from edgegate.loading import save as save_checkpoint
from tests.unit._models import relu_onnx_bytes

ZOO_CLASS = "edgegate.zoo.models:ThresholdMLP"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_loading")


@pytest.fixture(scope="module")
def seeds(work: Path) -> dict[str, bytes]:
    """Real files of each format edgegate detects, from one small zoo model."""
    torch.manual_seed(0)
    model = zoo.build("threshold_gate").eval()
    assert f"{type(model).__module__}:{type(model).__qualname__}" == ZOO_CLASS
    save_checkpoint(model, work / "ckpt.pt", meta={"note": "seed"})
    sd = model.state_dict()
    torch.save(sd, work / "legacy.pt", _use_new_zipfile_serialization=False)
    spec = {"class": ZOO_CLASS, "config": model.get_config()}
    meta = {"format": "edgegate-checkpoint", "version": "1", "spec": json.dumps(spec)}
    out = {
        "checkpoint": (work / "ckpt.pt").read_bytes(),
        "legacy": (work / "legacy.pt").read_bytes(),
        "safetensors": save(sd),
        "safetensors_ckpt": save(sd, metadata=meta),
        "pickle": pickle.dumps({"a": [1, 2.0, "x"]}, protocol=2),
        "onnx": relu_onnx_bytes(),
    }
    return out


def test_seeds_are_what_we_think(seeds: dict[str, bytes], work: Path) -> None:
    """The fuzzers start from files of every accepted format (else they only test the refusals)."""
    expected = {
        "checkpoint": ModelFormat.EDGEGATE_CHECKPOINT,
        "legacy": ModelFormat.STATE_DICT,
        "safetensors": ModelFormat.SAFETENSORS,
        "safetensors_ckpt": ModelFormat.EDGEGATE_CHECKPOINT,
        "pickle": ModelFormat.FULL_PICKLE,
        "onnx": ModelFormat.ONNX,
    }
    for name, data in seeds.items():
        (work / "seed.bin").write_bytes(data)
        assert detect_format(work / "seed.bin") is expected[name], name
    for name in ("checkpoint", "safetensors_ckpt"):
        (work / "seed.bin").write_bytes(seeds[name])
        assert load(work / "seed.bin").spec["class"] == ZOO_CLASS


def _load_both_ways(path: Path) -> None:
    result = expect_edgegate_error(load, path)
    fmt = expect_edgegate_error(detect_format, path)
    if isinstance(fmt, ModelFormat) and fmt in CODE_FORMATS:
        # Refused, not run: the only way such a file loads is with --trust-model.
        assert isinstance(result, UnsafeModelError), (fmt, result)
    result = expect_edgegate_error(load, path, model_class=ZOO_CLASS)
    if not isinstance(result, EdgegateError):
        assert isinstance(result.module, torch.nn.Module)


@FUZZ
@given(data=st.data())
def test_fuzz_model_loader(seeds: dict[str, bytes], work: Path, data: st.DataObject) -> None:
    blob = data.draw(framed(list(seeds.values())), label="file")
    path = work / "fuzz.pt"
    path.write_bytes(blob)
    _load_both_ways(path)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "X", 3]),
        "shape": st.lists(st.integers(-2, 70), max_size=3) | _json,
        "data_offsets": st.lists(st.integers(-2, 300), max_size=3) | _json,
    },
)
_config = st.dictionaries(
    st.sampled_from(["in_features", "hidden", "out_features", "threshold", "bogus", "1x"]),
    st.integers(-3, 200) | st.floats(allow_nan=True) | st.text(max_size=4) | st.none(),
    max_size=3,
)


@st.composite
def _safetensors(draw: st.DrawFn) -> bytes:
    header: dict = draw(st.dictionaries(st.sampled_from(["fc1.weight", "fc1.bias", "w", ""]), _entry, max_size=3))
    if draw(st.booleans()):
        spec = {"class": draw(st.sampled_from([ZOO_CLASS, "edgegate.zoo.models:Nope", "os:system", "x y"])),
                "config": draw(_config)}
        meta = {"format": "edgegate-checkpoint", "version": draw(st.sampled_from(["1", "2", "x", "01"])),
                "spec": draw(st.sampled_from([json.dumps(spec), "{", "[]"]))}
        header["__metadata__"] = draw(st.sampled_from([meta, {"k": 1}, [1], "s"]))
    raw = json.dumps(header).encode()
    body = draw(st.binary(max_size=400))
    return len(raw).to_bytes(8, "little") + raw + body


@FUZZ
@given(blob=_safetensors())
def test_fuzz_safetensors_headers(work: Path, blob: bytes) -> None:
    path = work / "fuzz.safetensors"
    path.write_bytes(blob)
    _load_both_ways(path)


@FUZZ
@given(config=_config, version=st.sampled_from([1, "1", 2, None, "x"]), state=st.sampled_from(["ok", "none", "junk"]))
def test_fuzz_checkpoint_fields(seeds: dict[str, bytes], work: Path, config: dict, version, state: str) -> None:
    """A well-formed torch.save archive whose checkpoint fields (config, version, state_dict) are hostile."""
    (work / "base.pt").write_bytes(seeds["checkpoint"])
    raw = torch.load(work / "base.pt", weights_only=True)
    raw["spec"] = json.dumps({"class": ZOO_CLASS, "config": config})
    raw["version"] = version
    raw["state_dict"] = {"ok": raw["state_dict"], "none": None, "junk": {"w": torch.zeros(3)}}[state]
    torch.save(raw, work / "fields.pt")
    _load_both_ways(work / "fields.pt")


@FUZZ
@given(blob=mutated([b"\x80\x02}q\x00.", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94."]))
def test_fuzz_bare_pickles_are_never_run(work: Path, blob: bytes) -> None:
    path = work / "fuzz.pkl"
    path.write_bytes(blob)
    result = expect_edgegate_error(load, path)
    assert isinstance(result, EdgegateError)  # a bare pickle never loads without --trust-model

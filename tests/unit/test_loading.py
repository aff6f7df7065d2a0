"""edgegate.loading: checkpoint round trip, format detection by content, refusal of code-running formats."""

from __future__ import annotations

import fractions
import hashlib
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _models import TinyNet, relu_onnx_bytes
from safetensors.torch import save_file

from edgegate.errors import ModelFormatError, UnsafeModelError
from edgegate.loading import ModelFormat, detect_format, load, save

TINY = f"{TinyNet.__module__}:TinyNet"  # importable because pytest puts tests/unit on sys.path
X = torch.linspace(-1.0, 1.0, 2 * 4).reshape(2, 4)


def _model(seed: int = 0, **config) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**config).eval()


class EdgeTinyNet(TinyNet):
    """TinyNet as if it lived inside the edgegate package (the only classes loaded without --model)."""


EdgeTinyNet.__module__ = "edgegate._test_loading_models"


@pytest.fixture
def edge_class(monkeypatch: pytest.MonkeyPatch) -> type[EdgeTinyNet]:
    mod = types.ModuleType(EdgeTinyNet.__module__)
    mod.EdgeTinyNet = EdgeTinyNet
    monkeypatch.setitem(sys.modules, EdgeTinyNet.__module__, mod)
    return EdgeTinyNet


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ------------------------------------------------------------------------------------ checkpoint


def test_checkpoint_round_trip_gives_equal_outputs(tmp_path: Path) -> None:
    model = _model(hidden=5)
    path = tmp_path / "tiny.pt"
    save(model, path, meta={"metrics": {"acc": 0.5}})
    loaded = load(path, model_class=TINY)
    assert loaded.format is ModelFormat.EDGEGATE_CHECKPOINT
    assert isinstance(loaded.module, TinyNet) and not loaded.module.training
    assert loaded.module.hidden == 5
    assert loaded.spec == {
        "class": TINY,
        "config": {"in_features": 4, "hidden": 5, "out_features": 3},
        "meta": {"metrics": {"acc": 0.5}},
    }
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.path == path
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(X), model(X), rtol=0, atol=0)
    assert _listing(tmp_path) == ["tiny.pt"]  # the atomic write left no temp file


def test_checkpoint_opens_with_torch_weights_only(tmp_path: Path) -> None:
    model = _model()
    save(model, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert sorted(raw) == ["format", "spec", "state_dict", "version"]
    assert raw["format"] == "edgegate-checkpoint" and raw["version"] == 1
    assert json.loads(raw["spec"]) == {"class": TINY, "config": model.get_config()}
    assert sorted(raw["state_dict"]) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert torch.equal(raw["state_dict"]["fc1.weight"], model.fc1.weight)


def test_edgegate_class_loads_without_model_class(tmp_path: Path, edge_class: type) -> None:
    torch.manual_seed(1)
    model = edge_class(hidden=6).eval()
    save(model, tmp_path / "edge.bin")
    loaded = load(tmp_path / "edge.bin")
    assert type(loaded.module) is edge_class
    assert loaded.spec["class"] == "edgegate._test_loading_models:EdgeTinyNet"
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(X), model(X), rtol=0, atol=0)


def test_class_outside_edgegate_needs_model_flag(tmp_path: Path) -> None:
    save(_model(), tmp_path / "m.pt")
    with pytest.raises(UnsafeModelError, match=f"outside edgegate.*pass --model {TINY}"):
        load(tmp_path / "m.pt")


def test_save_without_get_config_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="has no get_config"):
        save(torch.nn.Linear(2, 2), tmp_path / "lin.pt")
    assert _listing(tmp_path) == []


def test_save_failure_mid_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        save(_model(), tmp_path / "m.pt")
    assert _listing(tmp_path) == []


def test_checkpoint_with_newer_version_is_refused(tmp_path: Path) -> None:
    torch.save(
        {"format": "edgegate-checkpoint", "version": 2, "spec": "{}", "state_dict": {}}, tmp_path / "v2.pt"
    )
    with pytest.raises(ModelFormatError, match="has version 2; this edgegate reads version 1"):
        load(tmp_path / "v2.pt", model_class=TINY)


def test_checkpoint_without_spec_is_refused(tmp_path: Path) -> None:
    torch.save(
        {"format": "edgegate-checkpoint", "version": 1, "state_dict": _model().state_dict()},
        tmp_path / "nospec.pt",
    )
    with pytest.raises(ModelFormatError, match="nospec.pt has no valid spec"):
        load(tmp_path / "nospec.pt", model_class=TINY)


def test_checkpoint_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    model = _model(hidden=5)
    path = tmp_path / "m.pt"
    save(model, path)
    raw = torch.load(path, weights_only=True)
    raw["spec"] = json.dumps({"class": TINY, "config": {"hidden": 7}})
    torch.save(raw, path)
    msg = r"weights in .*m\.pt do not fit TinyNet: fc1.bias has shape \[5\] in the file, the model builds \[7\]"
    with pytest.raises(ModelFormatError, match=msg):
        load(path, model_class=TINY)


def test_safetensors_edgegate_checkpoint(tmp_path: Path, edge_class: type) -> None:
    model = edge_class(hidden=3).eval()
    spec = {"class": "edgegate._test_loading_models:EdgeTinyNet", "config": model.get_config()}
    save_file(
        model.state_dict(),
        tmp_path / "m.pt",
        metadata={"format": "edgegate-checkpoint", "version": "1", "spec": json.dumps(spec)},
    )
    loaded = load(tmp_path / "m.pt")
    assert loaded.format is ModelFormat.EDGEGATE_CHECKPOINT and loaded.spec == spec
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(X), model(X), rtol=0, atol=0)


# ------------------------------------------------------------------------ weights-only formats


@pytest.mark.parametrize("writer", ["zip", "legacy", "nested", "safetensors"])
def test_state_dict_needs_model_class_then_loads(tmp_path: Path, writer: str) -> None:
    model = _model(seed=3)
    path = tmp_path / "weights.onnx"  # misleading extension on purpose
    sd = model.state_dict()
    if writer == "zip":
        torch.save(sd, path)
    elif writer == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif writer == "nested":
        torch.save({"epoch": 3, "state_dict": sd}, path)
    else:
        save_file(sd, path)
    expected = ModelFormat.SAFETENSORS if writer == "safetensors" else ModelFormat.STATE_DICT
    assert detect_format(path) is expected
    with pytest.raises(ModelFormatError, match="weights only, no architecture.*pass --model"):
        load(path)
    loaded = load(path, model_class=TINY)
    assert loaded.format is expected and loaded.spec == {"class": TINY, "config": {}}
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(X), model(X), rtol=0, atol=0)


def test_state_dict_mismatch_names_the_keys(tmp_path: Path) -> None:
    sd = _model().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["fc2.bias"]
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(
        ModelFormatError, match=r"missing keys \[fc2.bias\], unexpected keys \[extra.weight\]"
    ):
        load(tmp_path / "sd.pt", model_class=TINY)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("no_such_module_xyz:Net", "cannot import no_such_module_xyz:Net"),
        ("collections:OrderedDict", "is not a torch.nn.Module subclass"),
        ("os.system; rm", "is not of the form"),
        ("edgegate.zoo.models:ThresholdMLP\n", "is not of the form"),
    ],
)
def test_bad_model_class_is_a_clear_error(tmp_path: Path, bad: str, message: str) -> None:
    torch.save(_model().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelFormatError, match=message):
        load(tmp_path / "sd.pt", model_class=bad)


# --------------------------------------------------------------------------- code-running formats


def _write_full_pickle(model: TinyNet, path: Path) -> None:
    torch.save(model, path)


def _write_raw_pickle(model: TinyNet, path: Path) -> None:
    path.write_bytes(pickle.dumps(model))


def _write_torchscript(model: TinyNet, path: Path) -> None:
    torch.jit.save(torch.jit.trace(model, X), str(path))


def _write_pt2(model: TinyNet, path: Path) -> None:
    torch.export.save(torch.export.export(model, (X,)), str(path))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated in torch 2.13
@pytest.mark.parametrize(
    "writer, fmt, what",
    [
        (_write_full_pickle, ModelFormat.FULL_PICKLE, "a full pickle"),
        (_write_raw_pickle, ModelFormat.FULL_PICKLE, "a full pickle"),
        (_write_torchscript, ModelFormat.TORCHSCRIPT, "a TorchScript archive"),
        (_write_pt2, ModelFormat.EXPORTED_PROGRAM, r"a torch.export program \(.pt2\)"),
    ],
)
def test_code_running_formats_need_trust(tmp_path: Path, writer, fmt: ModelFormat, what: str) -> None:
    model = _model(seed=5)
    path = tmp_path / "model.safetensors"  # misleading extension on purpose
    writer(model, path)
    assert detect_format(path) is fmt
    with pytest.raises(UnsafeModelError, match=f"is {what}, which runs code when loaded; pass --trust-model"):
        load(path)
    loaded = load(path, trust_model=True)
    assert loaded.format is fmt and loaded.spec == {}
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(X), model(X), rtol=1e-6, atol=1e-6)


def test_weights_only_file_without_tensors_is_refused(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "notes": [1, 2]}, tmp_path / "obj.pt")
    with pytest.raises(ModelFormatError, match="holds a dict, not a state_dict or edgegate checkpoint"):
        detect_format(tmp_path / "obj.pt")


def test_trusted_pickle_of_a_non_module_is_refused(tmp_path: Path) -> None:
    torch.save(fractions.Fraction(1, 3), tmp_path / "obj.pt")
    assert detect_format(tmp_path / "obj.pt") is ModelFormat.FULL_PICKLE
    with pytest.raises(ModelFormatError, match="holds a Fraction, not a torch.nn.Module"):
        load(tmp_path / "obj.pt", trust_model=True)


# ------------------------------------------------------------------------------ detection & damage


def test_onnx_is_detected_by_content_and_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(relu_onnx_bytes())
    assert onnx.load(str(path)).graph.node[0].op_type == "Relu"
    assert detect_format(path) is ModelFormat.ONNX
    with pytest.raises(ModelFormatError, match="is an ONNX model; load\\(\\) reads PyTorch models"):
        load(path)


def test_random_bytes_are_unknown(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert detect_format(path) is ModelFormat.UNKNOWN
    with pytest.raises(ModelFormatError, match="is not a format edgegate recognizes"):
        load(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelFormatError, match=r"empty\.pt is empty \(0 bytes\)"):
        detect_format(tmp_path / "empty.pt")
    with pytest.raises(ModelFormatError, match="does not exist"):
        load(tmp_path / "nope.pt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("writer", ["checkpoint", "torchscript", "safetensors"])
def test_truncated_files_are_format_errors(tmp_path: Path, writer: str) -> None:
    model = _model()
    path = tmp_path / "m.pt"
    if writer == "checkpoint":
        save(model, path)
    elif writer == "torchscript":
        _write_torchscript(model, path)
    else:
        save_file(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=r"m\.pt is a truncated"):
        load(path, model_class=TINY, trust_model=True)


def test_corrupt_zip_member_is_a_format_error(tmp_path: Path) -> None:
    save(_model(), tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    start = data.index(b"data.pkl") + len(b"data.pkl")  # corrupt the pickle stream after its header
    data[start + 40 : start + 80] = b"\xff" * 40
    (tmp_path / "m.pt").write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=r"m\.pt cannot be read \(.*\); re-save it"):
        load(tmp_path / "m.pt", model_class=TINY)


def test_save_into_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"cannot write checkpoint .*m\.pt: No such file or directory"):
        save(_model(), tmp_path / "missing" / "m.pt")
    assert _listing(tmp_path) == []


def test_checkpoint_gets_normal_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        save(_model(), tmp_path / "m.pt")
    finally:
        os.umask(mask)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


# ----------------------------------------------------------------------------------- hostile files


def _resave(path: Path, **changes) -> None:
    raw = torch.load(path, weights_only=True)
    raw.update(changes)
    torch.save(raw, path)


def test_huge_config_is_refused_before_allocating(tmp_path: Path) -> None:
    # hidden=10**12 would ask for terabytes; the meta-device build compares shapes first, allocating nothing.
    save(_model(), tmp_path / "m.pt")
    _resave(tmp_path / "m.pt", spec=json.dumps({"class": TINY, "config": {"hidden": 10**12}}))
    msg = r"fc1.bias has shape \[8\] in the file, the model builds \[1000000000000\]"
    with pytest.raises(ModelFormatError, match=msg):
        load(tmp_path / "m.pt", model_class=TINY)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"hidden": -1}, r"config does not fit TinyNet \(.*\); re-save it"),  # the constructor raises RuntimeError
        ({"nope": 1}, r"config does not fit TinyNet \(.*unexpected keyword argument 'nope'"),
        ({"1bad": 1}, "spec has no config dict of keyword arguments"),
        ([1, 2], "spec has no config dict of keyword arguments"),
    ],
)
def test_bad_configs_are_format_errors(tmp_path: Path, config, message: str) -> None:
    save(_model(), tmp_path / "m.pt")
    _resave(tmp_path / "m.pt", spec=json.dumps({"class": TINY, "config": config}))
    with pytest.raises(ModelFormatError, match=message):
        load(tmp_path / "m.pt", model_class=TINY)


@pytest.mark.parametrize(
    "spec", ["[" * 100_000, '{"class": "x", "config": {}, "n": 1' + "0" * 5000 + "}", "\ud800", None]
)
def test_unparsable_specs_are_format_errors(tmp_path: Path, spec) -> None:
    save(_model(), tmp_path / "m.pt")
    _resave(tmp_path / "m.pt", spec=spec)
    with pytest.raises(ModelFormatError, match="has no valid spec"):
        load(tmp_path / "m.pt", model_class=TINY)


def _safetensors(header: bytes, body: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + body


@pytest.mark.parametrize(
    "header, message",
    [
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": "0,4"}}', "entry 'w' is malformed"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}', "entry 'w' is malformed"),
        (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "entry 'w' is malformed"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}', "entry 'w' is malformed"),
        (b'{"w": [1, 2]}', "entry 'w' is malformed"),
        (b'{"__metadata__": [1], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
         "__metadata__ is not a str->str table"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}}', "is a truncated safetensors file"),
        (b"{" + b'"a":' * 1 + b"[" * 50_000 + b"]" * 50_000 + b"}", "corrupt safetensors header"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "corrupt safetensors header"),
        (b'{"a": "\xff"}', "corrupt safetensors header"),
    ],
)
def test_malformed_safetensors_headers(tmp_path: Path, header: bytes, message: str) -> None:
    (tmp_path / "m.st").write_bytes(_safetensors(header, b"\x00" * 4))
    with pytest.raises(ModelFormatError, match=message):
        load(tmp_path / "m.st", model_class=TINY)


def test_zip_bomb_member_is_refused_before_inflating(tmp_path: Path) -> None:
    import zipfile

    save(_model(), tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as src, zipfile.ZipFile(tmp_path / "bomb.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_STORED)
        dst.writestr("archive/data/9", b"\x00" * (8 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.pt").stat().st_size < 100_000
    with pytest.raises(ModelFormatError, match="archive member 'archive/data/9' claims 8388608 bytes .*zip bomb"):
        load(tmp_path / "bomb.pt", model_class=TINY)


def test_self_nested_pickle_is_not_a_recursion_error(tmp_path: Path) -> None:
    d: dict = {}
    d["state_dict"] = d
    torch.save(d, tmp_path / "loop.pt")
    with pytest.raises(ModelFormatError, match="holds a dict, not a state_dict"):
        load(tmp_path / "loop.pt")


def test_unreadable_model_file_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(ModelFormatError, match="dir.pt is a directory without config.json"):
        load(tmp_path / "dir.pt")


def test_safetensors_whose_length_prefix_looks_like_a_pickle(tmp_path: Path) -> None:
    """A 640-byte header is stored as 80 02 00..: the bytes a protocol-2 pickle starts with."""
    from safetensors.torch import save as save_bytes

    sd = _model().state_dict()
    data = next(
        d for k in range(800) if (d := save_bytes(sd, metadata={"pad": "x" * k}))[:2] == b"\x80\x02"
    )
    (tmp_path / "m.st").write_bytes(data)
    assert detect_format(tmp_path / "m.st") is ModelFormat.SAFETENSORS
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "m.st", model_class=TINY).module(X), _model()(X))

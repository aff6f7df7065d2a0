"""Fuzz the bundle loader: `read_bundle` on mutated and hostile manifests and files.

Whatever manifest.json and the files hold, reading a bundle returns a `Bundle` whose listed files are
plain names inside the directory and (with verification) match their sha256, or raises an
EdgegateError with a one-line message.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _fuzz import FUZZ, expect_edgegate_error, framed, mutated
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgegate.bundle import Bundle, read_bundle
from edgegate.bundle_write import write_bundle
from edgegate.errors import EdgegateError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _onnx() -> bytes:
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    w.external_data.add(key="location", value="weights.bin")
    w.external_data.add(key="length", value="8")
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle: ONNX with external data, weights, golden npz, the manifest write_bundle makes."""
    root = tmp_path_factory.mktemp("fuzz_bundle")
    (root / "secret.txt").write_text("outside the bundle")
    golden = io.BytesIO()
    np.savez(golden, **{"input.x": np.ones((2, 2), np.float32)})
    weights = np.zeros(2, np.float32).tobytes()
    files = {"model.onnx": _onnx(), "weights.bin": weights, "golden_io.npz": golden.getvalue()}
    manifest = {"target": "cpu", "target_options": {"intra_op_threads": 1}, "quant": {"scheme": "fp32"}}
    return write_bundle(root / "good", files, manifest)


@pytest.fixture(scope="module")
def scratch(good: Path) -> Path:
    return good.parent / "scratch"


def _fresh(good: Path, scratch: Path) -> Path:
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(good, scratch, symlinks=True)
    return scratch


def _read_every_way(path: Path) -> None:
    """read_bundle with and without verification, then every accessor; check what a success promises."""
    for verify in (True, False):
        bundle = expect_edgegate_error(read_bundle, path, verify=verify)
        if isinstance(bundle, EdgegateError):
            continue
        assert isinstance(bundle, Bundle)
        for name in bundle.files:
            fp = bundle.file(name)
            assert fp.parent == path and fp.is_file() and not fp.is_symlink(), name
            if verify:
                entry = bundle.manifest["files"][name]
                assert hashlib.sha256(fp.read_bytes()).hexdigest() == entry["sha256"], name
        expect_edgegate_error(lambda b=bundle: b.target)
        expect_edgegate_error(lambda b=bundle: b.target_options)
        expect_edgegate_error(bundle.file, "engine.plan")


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_bytes(good: Path, scratch: Path, data: st.DataObject) -> None:
    path = _fresh(good, scratch)
    seed = (good / "manifest.json").read_bytes()
    (path / "manifest.json").write_bytes(data.draw(framed([seed]), label="manifest.json"))
    _read_every_way(path)


_names = st.one_of(
    st.sampled_from(["model.onnx", "weights.bin", "golden_io.npz", "manifest.json", "../secret.txt", "/etc/passwd",
                     "..", ".", "", "a/b", "a\\b", "C:x", "x\x00y", "x\ny", "nope.bin", "é" * 300]),
    st.text(max_size=12),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_entries = st.one_of(
    st.fixed_dictionaries({}, optional={"sha256": st.sampled_from(["0" * 64, "A" * 64, "xyz"]) | _json,
                                        "bytes": st.integers(-1, 100) | _json}),
    _json,
)


@FUZZ
@given(
    files=st.dictionaries(_names, _entries, max_size=4) | _json,
    version=st.sampled_from([1, 1.0, True, "1", 2, None]),
    target=st.sampled_from(["cpu", 3, None, ["cpu"]]),
    options=st.sampled_from([{}, {"intra_op_threads": 1}, [1], "x", None]),
    keep=st.booleans(),
)
def test_fuzz_manifest_structure(good: Path, scratch: Path, files, version, target, options, keep: bool) -> None:
    """Well-formed JSON, hostile content: names that escape, wrong types, the real entries mixed in."""
    path = _fresh(good, scratch)
    manifest = json.loads((good / "manifest.json").read_text())
    if keep and isinstance(files, dict):
        files = {**manifest["files"], **files}
    manifest.update(files=files, manifest_version=version, target=target, target_options=options)
    (path / "manifest.json").write_text(json.dumps(manifest))
    _read_every_way(path)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["model.onnx", "weights.bin", "golden_io.npz"]))
def test_fuzz_files_with_consistent_manifest(good: Path, scratch: Path, data: st.DataObject, which: str) -> None:
    """A hostile author: mutated file, manifest updated to match, so only the content checks can refuse it."""
    path = _fresh(good, scratch)
    blob = data.draw(mutated([(good / which).read_bytes()]), label=which)
    (path / which).write_bytes(blob)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][which] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    _read_every_way(path)

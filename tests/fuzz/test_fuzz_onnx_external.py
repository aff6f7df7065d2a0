"""Fuzz the ONNX external-data guard: locations that try to leave the bundle, and malformed model bytes.

Properties: the guard accepts a location only if it is relative, free of ``..`` and links, and
resolves inside the bundle; the standard-library wire parser (devices without onnx) finds exactly
the locations onnx finds; any bytes give locations or a BundleError, never another exception.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
import pytest
from _fuzz import FUZZ, expect_edgegate_error, framed
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgegate.bundle import check_onnx_external_data, external_data_locations
from edgegate.errors import BundleError
from edgegate.onnx_safety import _locations_onnx, _locations_wire

_PARTS = ["..", ".", "", "ok.bin", "sub", "link.bin", "inlink.bin", "linkdir", "secret.bin", "C:", "~", "a\x00", "\x7f",
          "\\..", "é", "x y", "..\\..", "%2e%2e", "/"]
locations = st.one_of(
    st.lists(st.sampled_from(_PARTS), min_size=1, max_size=5).map("/".join),
    st.lists(st.sampled_from(_PARTS), min_size=1, max_size=4).map("\\".join),
    st.text(max_size=12),
)


def _tensor(name: str, location: str) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="length", value="16")
    return t


@st.composite
def models(draw: st.DrawFn, location: st.SearchStrategy[str] = locations) -> bytes:
    """A model with external tensors in initializers, Constant attributes, If branches and functions."""
    nodes, inits, functions = [], [], []
    out = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])
    for i in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["initializer", "constant", "if", "function", "sparse"]))
        t = _tensor(f"t{i}", draw(location))
        if where == "initializer":
            inits.append(t)
        elif where == "constant":
            nodes.append(helper.make_node("Constant", [], [f"c{i}"], value=t))
        elif where == "if":
            branch = helper.make_graph([helper.make_node("Constant", [], ["w"], value=t)], f"b{i}", [], [out])
            nodes.append(helper.make_node("If", ["cond"], [f"y{i}"], then_branch=branch, else_branch=branch))
        elif where == "sparse":
            idx = helper.make_tensor(f"i{i}", TensorProto.INT64, [1], [0])
            nodes.append(helper.make_node("Constant", [], [f"s{i}"],
                                          sparse_value=helper.make_sparse_tensor(t, idx, [4])))
        else:
            body = [helper.make_node("Constant", [], ["w"], value=t)]
            functions.append(helper.make_function("fz", f"F{i}", [], ["w"], body, [helper.make_opsetid("", 20)]))
            nodes.append(helper.make_node(f"F{i}", [], [f"f{i}"], domain="fz"))
    graph = helper.make_graph(nodes, "g", [], [out], inits)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("fz", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=functions).SerializeToString()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_external")
    (root / "secret.bin").write_bytes(b"\x00" * 16)
    (root / "outdir").mkdir()
    d = root / "bundle"
    d.mkdir()
    (d / "ok.bin").write_bytes(b"\x00" * 16)
    (d / "sub").mkdir()
    (d / "sub" / "ok.bin").write_bytes(b"\x00" * 16)
    (d / "link.bin").symlink_to(root / "secret.bin")
    (d / "inlink.bin").symlink_to(d / "ok.bin")
    (d / "linkdir").symlink_to(root / "outdir")
    return d


def _confined(location: str, bundle: Path) -> bool:
    """Independent statement of the rule the guard enforces."""
    if not location or PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute():
        return False
    if PureWindowsPath(location).drive or ".." in location.replace("\\", "/").split("/"):
        return False
    if any(ord(c) < 32 or ord(c) == 127 for c in location):  # control characters, DEL included
        return False
    target = bundle / location
    for p in [target, *target.parents]:
        if p == bundle:
            break
        if p.is_symlink():
            return False
    root = bundle.resolve()
    return target.resolve() == root or root in target.resolve().parents


@pytest.fixture(params=["onnx", "wire"])
def parser(request: pytest.FixtureRequest) -> str:
    return request.param


def _check(model: Path, bundle: Path, parser: str):
    if parser == "onnx":
        return expect_edgegate_error(check_onnx_external_data, model, bundle)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "onnx", None)  # as on a device without onnx: the wire parser runs
        return expect_edgegate_error(check_onnx_external_data, model, bundle)


@FUZZ
@given(data=models())
def test_fuzz_locations_are_confined(bundle_dir: Path, parser: str, data: bytes) -> None:
    (bundle_dir / "model.onnx").write_bytes(data)
    result = _check(bundle_dir / "model.onnx", bundle_dir, parser)
    found = _locations_onnx(onnx.load_model_from_string(data))
    if isinstance(result, BundleError):
        assert any(not _confined(loc, bundle_dir) for _, loc in found), result
    else:
        assert sorted(result) == sorted({loc for _, loc in found})
        assert all(_confined(loc, bundle_dir) for loc in result), result


@FUZZ
@given(data=models())
def test_fuzz_wire_parser_agrees_with_onnx(data: bytes) -> None:
    assert sorted(_locations_wire(data)) == sorted(_locations_onnx(onnx.load_model_from_string(data)))


_seeds = [
    helper.make_model(
        helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])],
                          [_tensor("w", "ok.bin")]),
        opset_imports=[helper.make_opsetid("", 20)],
    ).SerializeToString()
]


@FUZZ
@given(data=st.one_of(framed(_seeds), models().flatmap(lambda m: framed([m]))))
@example(  # found by a long run: a tensor name that is not UTF-8 (protobuf returns bytes for it)
    data=b"\x08\x0e:A\x12\x01g*+\x08\x04\x10\x01B\x01\xffj\x12\n\x08location\x12\x06ok.binj\x0c\n\x06length"
    b"\x12\x0216p\x01b\x0f\n\x01w\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x04B\x04\n\x00\x10\x14"
)
def test_fuzz_malformed_model_bytes(data: bytes) -> None:
    with_onnx = expect_edgegate_error(external_data_locations, data, "model.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "onnx", None)
        wire = expect_edgegate_error(external_data_locations, data, "model.onnx")
    if not isinstance(with_onnx, BundleError) and not isinstance(wire, BundleError):
        # Whatever onnx (and so the runtime) reads, the wire walk reads too: it may see more, never less.
        assert set(with_onnx) <= set(wire)

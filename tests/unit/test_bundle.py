"""edgegate.bundle: atomic writes, verification on read, and the ONNX external-data guard."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgegate import bundle as bundle_mod
from edgegate.bundle import (
    MANIFEST_VERSION,
    check_onnx_external_data,
    external_data_locations,
    read_bundle,
    sha256_file,
)
from edgegate.bundle_write import check_destination, write_bundle
from edgegate.errors import BundleError

MODEL = b"\x08\x07fake-onnx-bytes"
GOLDEN = bytes(range(256)) * 4


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _write(tmp_path: Path, **kw) -> Path:
    return write_bundle(
        tmp_path / "b", {"model.bin": MODEL, "golden_io.npz": GOLDEN}, {"target": "cpu"}, **kw
    )


# --------------------------------------------------------------------------------------------- write


def test_round_trip_records_hashes_and_sizes(tmp_path: Path) -> None:
    src = tmp_path / "src.npz"
    src.write_bytes(GOLDEN)
    manifest = {"target": "cpu", "target_options": {"intra_op_threads": 1}, "quant": {"scheme": "fp32"}}
    out = write_bundle(tmp_path / "b", {"model.bin": MODEL, "golden_io.npz": src}, manifest)
    assert out == tmp_path / "b"
    assert _listing(tmp_path) == ["b", "src.npz"]  # no temp dir left beside it
    assert _listing(out) == ["golden_io.npz", "manifest.json", "model.bin"]
    assert manifest == {
        "target": "cpu",
        "target_options": {"intra_op_threads": 1},
        "quant": {"scheme": "fp32"},
    }
    written = json.loads((out / "manifest.json").read_text())
    assert written["files"] == {
        "model.bin": {"sha256": hashlib.sha256(MODEL).hexdigest(), "bytes": len(MODEL)},
        "golden_io.npz": {"sha256": hashlib.sha256(GOLDEN).hexdigest(), "bytes": 1024},
    }
    assert written["manifest_version"] == MANIFEST_VERSION == 1
    assert (out / "manifest.json").read_text() == json.dumps(written, sort_keys=True, indent=2) + "\n"
    b = read_bundle(out)
    assert b.path == out and b.manifest == written
    assert b.target == "cpu" and b.target_options == {"intra_op_threads": 1}
    assert b.files == ("golden_io.npz", "model.bin")
    assert b.file("golden_io.npz").read_bytes() == GOLDEN
    with pytest.raises(BundleError, match=r"has no file engine.plan \(it has: golden_io.npz, model.bin\)"):
        b.file("engine.plan")


def test_interrupt_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_fsync = os.fsync

    def fsync_then_interrupt(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # after the first file is on disk, before the second is done
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(bundle_mod.os, "fsync", fsync_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path)
    assert len(calls) == 2
    assert _listing(tmp_path) == []


def test_file_size_limit_is_a_one_line_bundle_error(tmp_path: Path) -> None:
    """A real write failure: the kernel refuses writes past RLIMIT_FSIZE (EFBIG), as a full disk refuses (ENOSPC)."""
    script = (
        "import resource, signal, sys\n"
        "from edgegate.bundle_write import write_bundle\n"
        "from edgegate.errors import BundleError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    write_bundle(sys.argv[1], {'small.bin': b'x' * 100, 'big.bin': b'y' * 100_000}, {'target': 'cpu'})\n"
        "except BundleError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "b")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"cannot write bundle {tmp_path / 'b'}: File too large (")
    assert r.stdout.rstrip().endswith("big.bin); check free space and permissions") and r.stdout.count("\n") == 1
    assert _listing(tmp_path) == []  # neither the bundle nor its temp dir


def test_missing_source_file_leaves_nothing(tmp_path: Path) -> None:
    files = {"a.bin": b"x", "b.bin": tmp_path / "missing.bin"}
    with pytest.raises(
        BundleError, match=r"cannot write bundle .*: No such file or directory \(.*missing.bin\)"
    ):
        write_bundle(tmp_path / "b", files, {})
    assert _listing(tmp_path) == []


def test_existing_bundle_needs_overwrite(tmp_path: Path) -> None:
    _write(tmp_path)
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        write_bundle(tmp_path / "b", {"model.bin": b"v2"}, {"target": "cpu"})
    assert read_bundle(tmp_path / "b").file("model.bin").read_bytes() == MODEL
    write_bundle(tmp_path / "b", {"model.bin": b"v2"}, {"target": "cpu"}, overwrite=True)
    assert _listing(tmp_path) == ["b"]  # the old bundle, moved aside, is gone
    assert _listing(tmp_path / "b") == ["manifest.json", "model.bin"]
    assert read_bundle(tmp_path / "b").file("model.bin").read_bytes() == b"v2"


def test_failed_overwrite_keeps_the_old_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path)

    def interrupt(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(tmp_path / "b", {"model.bin": b"v2"}, {"target": "cpu"}, overwrite=True)
    monkeypatch.undo()
    assert _listing(tmp_path) == ["b"]
    assert read_bundle(tmp_path / "b").file("model.bin").read_bytes() == MODEL


def test_failed_swap_restores_the_old_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path)
    real_rename, calls = os.rename, []

    def rename(src, dst) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old bundle already moved aside; the new one fails to move in
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(bundle_mod.os, "rename", rename)
    with pytest.raises(BundleError, match="cannot write bundle .*: Invalid cross-device link"):
        write_bundle(tmp_path / "b", {"model.bin": b"v2"}, {"target": "cpu"}, overwrite=True)
    aside = calls[0][1]
    assert calls[0] == ("b", aside) and calls[2] == (aside, "b")  # moved aside, then moved back
    assert _listing(tmp_path) == ["b"]
    assert read_bundle(tmp_path / "b").file("model.bin").read_bytes() == MODEL


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/b", "..", ".", "", "c:evil", "a\\b", "manifest.json"]
)
def test_file_names_must_be_plain(tmp_path: Path, name: str) -> None:
    with pytest.raises(BundleError, match="cannot write bundle"):
        write_bundle(tmp_path / "b", {name: b"x"}, {})
    assert _listing(tmp_path) == []


def test_manifest_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest is not JSON-serializable"):
        write_bundle(tmp_path / "b", {"a.bin": b"x"}, {"when": object()})
    assert _listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------- read


def test_tampered_file_is_detected(tmp_path: Path) -> None:
    out = _write(tmp_path)
    (out / "model.bin").write_bytes(MODEL[:-1] + b"X")  # same size, different bytes
    with pytest.raises(BundleError) as info:
        read_bundle(out)
    assert str(info.value) == (
        f"bundle {out}: file model.bin does not match its sha256 in manifest.json (modified or corrupt); "
        "re-export the bundle"
    )
    assert read_bundle(out, verify=False).file("model.bin").read_bytes().endswith(b"X")


def _drop_file(out: Path) -> None:
    (out / "golden_io.npz").unlink()


def _bad_json(out: Path) -> None:
    (out / "manifest.json").write_text("{not json")


def _future_version(out: Path) -> None:
    m = json.loads((out / "manifest.json").read_text())
    m["manifest_version"] = 99
    (out / "manifest.json").write_text(json.dumps(m))


def _traversal_in_manifest(out: Path) -> None:
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["../secret"] = {"sha256": "0" * 64, "bytes": 1}
    (out / "manifest.json").write_text(json.dumps(m))


def _no_manifest(out: Path) -> None:
    (out / "manifest.json").unlink()


def _listed_file_is_link(out: Path) -> None:
    (out / "golden_io.npz").unlink()
    (out / "golden_io.npz").symlink_to(out / "model.bin")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_drop_file, "file golden_io.npz listed in manifest.json is missing or not a regular file"),
        (_bad_json, r"manifest.json is not valid JSON \(Expecting property name"),
        (_future_version, "manifest_version 99 is not supported"),
        (_traversal_in_manifest, "file name '../secret' must be a plain file name"),
        (_no_manifest, "has no manifest.json"),
        (_listed_file_is_link, "file golden_io.npz listed in manifest.json is missing or not a regular file"),
    ],
)
def test_damaged_bundles_are_refused(tmp_path: Path, damage, message: str) -> None:
    out = _write(tmp_path)
    damage(out)
    with pytest.raises(BundleError, match=message):
        read_bundle(out, verify=False)


def test_missing_bundle_dir(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is missing or not a directory"):
        read_bundle(tmp_path / "nope")


def test_unlisted_files_are_ignored_but_links_out_are_not(tmp_path: Path) -> None:
    out = _write(tmp_path)
    (tmp_path / "secret.txt").write_text("secret")
    (out / "notes.txt").write_text("unlisted")
    (out / "inside_link").symlink_to(out / "notes.txt")
    assert read_bundle(out).files == ("golden_io.npz", "model.bin")
    (out / "escape").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(BundleError, match="'escape' is a link pointing outside the bundle"):
        read_bundle(out)


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------- external data


def _ext_tensor(name: str, location: str) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="length", value="16")
    return t


def _ext_model(location: str, where: str = "initializer") -> bytes:
    """A model whose one external tensor sits in an initializer, an If branch, or a function body."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    const = helper.make_node("Constant", [], ["w"], value=_ext_tensor("w", location))
    functions, inits = [], []
    if where == "initializer":
        nodes, inits = [helper.make_node("Add", ["x", "w"], ["y"])], [_ext_tensor("w", location)]
    elif where == "if_subgraph":
        branch = helper.make_graph(
            [const], "branch", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])]
        )
        nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
    else:
        functions = [
            helper.make_function(
                "edgegate.test",
                "F",
                ["x"],
                ["y"],
                [const, helper.make_node("Add", ["x", "w"], ["y"])],
                [helper.make_opsetid("", 20)],
            )
        ]
        nodes = [helper.make_node("F", ["x"], ["y"], domain="edgegate.test")]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("edgegate.test", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=functions).SerializeToString()


@pytest.fixture(params=["onnx", "wire"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each external-data test with onnx installed and as on a device without onnx."""
    if request.param == "wire":
        monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    return request.param


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 16)
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "ok.bin").write_bytes(b"\x00" * 16)
    (d / "sub").mkdir()
    (d / "link.bin").symlink_to(tmp_path / "secret.bin")
    (d / "inlink.bin").symlink_to(d / "ok.bin")
    return d


@pytest.mark.parametrize("where", ["initializer", "if_subgraph", "function"])
@pytest.mark.parametrize(
    "location, message",
    [
        ("../secret.bin", "leaves the bundle"),
        ("sub/../../secret.bin", "leaves the bundle"),
        ("ABS", "is absolute"),
        ("link.bin", "goes through a link"),
        ("inlink.bin", "goes through a link"),
    ],
)
def test_external_data_outside_the_bundle_is_refused(
    bundle_dir: Path, parser: str, where: str, location: str, message: str
) -> None:
    if location == "ABS":
        location = str(bundle_dir.parent / "secret.bin")
    (bundle_dir / "model.onnx").write_bytes(_ext_model(location, where))
    with pytest.raises(BundleError, match=f"external data location '{location}' of tensor 'w' {message}"):
        check_onnx_external_data(bundle_dir / "model.onnx", bundle_dir)


@pytest.mark.parametrize("where", ["initializer", "if_subgraph", "function"])
def test_external_data_inside_the_bundle_is_accepted(bundle_dir: Path, parser: str, where: str) -> None:
    (bundle_dir / "model.onnx").write_bytes(_ext_model("ok.bin", where))
    assert check_onnx_external_data(bundle_dir / "model.onnx", bundle_dir) == ["ok.bin"]


def test_both_parsers_find_the_same_locations(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _ext_model("a.bin", "if_subgraph")
    model = onnx.load_model_from_string(data)
    model.graph.initializer.append(_ext_tensor("v", "b.bin"))
    model.functions.extend(onnx.load_model_from_string(_ext_model("c.bin", "function")).functions)
    data = model.SerializeToString()
    with_onnx = external_data_locations(data, "m")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert sorted(external_data_locations(data, "m")) == sorted(with_onnx)  # order may differ
    assert sorted(with_onnx) == [("v", "b.bin"), ("w", "a.bin"), ("w", "a.bin"), ("w", "c.bin")]


def test_invalid_onnx_bytes_are_a_bundle_error(bundle_dir: Path, parser: str) -> None:
    (bundle_dir / "model.onnx").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(BundleError, match=r"model.onnx is not a valid ONNX model"):
        check_onnx_external_data(bundle_dir / "model.onnx", bundle_dir)


def test_write_bundle_refuses_external_data_outside_or_unlisted(tmp_path: Path, parser: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(BundleError, match="cannot write bundle .*'../secret.bin' of tensor 'w' leaves the bundle"):
        write_bundle(tmp_path / "b", {"model.onnx": _ext_model("../secret.bin")}, {"target": "cpu"})
    with pytest.raises(BundleError, match="external data 'w.bin' of model.onnx is not listed in manifest.json"):
        write_bundle(tmp_path / "b", {"model.onnx": _ext_model("w.bin")}, {"target": "cpu"})
    assert _listing(tmp_path) == ["secret.bin"]  # nothing written, no temp dir left
    files = {"model.onnx": _ext_model("w.bin"), "w.bin": b"\x00" * 16}
    out = write_bundle(tmp_path / "b", files, {"target": "cpu"})
    assert read_bundle(out).files == ("model.onnx", "w.bin")


def _swap_model(out: Path, data: bytes) -> None:
    """Replace model.onnx after the write and fix up its manifest entry, as a hostile author would."""
    (out / "model.onnx").write_bytes(data)
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (out / "manifest.json").write_text(json.dumps(m))


def test_read_bundle_checks_external_data_even_without_verify(tmp_path: Path, parser: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 16)
    out = write_bundle(tmp_path / "b", {"model.onnx": _ext_model("w.bin"), "w.bin": b"1" * 16}, {"target": "cpu"})
    _swap_model(out, _ext_model("../secret.bin"))
    with pytest.raises(BundleError, match="'../secret.bin' of tensor 'w' leaves the bundle"):
        read_bundle(out, verify=False)
    _swap_model(out, _ext_model("x.bin"))
    (out / "x.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(BundleError, match="external data 'x.bin' of model.onnx is not listed in manifest.json"):
        read_bundle(out)
    _swap_model(out, _ext_model("w.bin"))
    assert read_bundle(out).files == ("model.onnx", "w.bin")


def test_bundle_gets_normal_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        out = _write(tmp_path)
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert (out / "manifest.json").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------- hostile manifests


def _edit_manifest(out: Path, **changes) -> None:
    m = json.loads((out / "manifest.json").read_text())
    m.update(changes)
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"files": {"a\nb": {"sha256": "0" * 64, "bytes": 1}}}, r"file name 'a\\nb' must be a plain file name"),
        ({"files": {"x\x00": {"sha256": "0" * 64, "bytes": 1}}}, "must be a plain file name"),
        ({"files": {"C:evil": {"sha256": "0" * 64, "bytes": 1}}}, "must be a plain file name"),
        ({"files": {"manifest.json": {"sha256": "0" * 64, "bytes": 1}}}, "manifest.json lists itself"),
        ({"files": {"model.bin": {"sha256": "ZZ", "bytes": 1}}}, "entry for model.bin has no sha256"),
        ({"files": {"model.bin": {"sha256": "0" * 64, "bytes": True}}}, "entry for model.bin has no byte count"),
        ({"files": {"model.bin": {"sha256": "0" * 64, "bytes": "17"}}}, "entry for model.bin has no byte count"),
        ({"files": ["model.bin"]}, "has no 'files' table"),
        ({"target_options": [1, 2]}, "'target_options' in manifest.json is not a dict"),
        ({"target": ["cpu"]}, "'target' in manifest.json is not a str"),
        ({"manifest_version": True}, "manifest_version True is not supported"),
        ({"manifest_version": "1"}, "manifest_version '1' is not supported"),
    ],
)
def test_hostile_manifests_are_refused(tmp_path: Path, changes: dict, message: str) -> None:
    out = _write(tmp_path)
    _edit_manifest(out, **changes)
    with pytest.raises(BundleError, match=message) as info:
        read_bundle(out, verify=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text", ["[" * 100_000 + "]" * 100_000, '{"n": 1' + "0" * 5000 + "}", b"\xff\xfe{}", '{"a": NaN'],
    ids=["deep", "huge-int", "not-utf8", "truncated"],
)
def test_unparsable_manifests_are_refused(tmp_path: Path, text) -> None:
    out = _write(tmp_path)
    data = text if isinstance(text, bytes) else text.encode()
    (out / "manifest.json").write_bytes(data)
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        read_bundle(out)


def test_oversized_manifest_is_refused_unread(tmp_path: Path) -> None:
    out = _write(tmp_path)
    with open(out / "manifest.json", "r+b") as f:
        f.truncate(bundle_mod.MANIFEST_MAX_BYTES + 1)  # sparse: no need to write 16 MiB
    with pytest.raises(BundleError, match="manifest.json is larger than 16 MiB"):
        read_bundle(out)


def test_link_loop_in_bundle_is_refused(tmp_path: Path) -> None:
    out = _write(tmp_path)
    (out / "loop").symlink_to(out / "loop")
    with pytest.raises(BundleError, match="'loop' is a link pointing outside the bundle"):
        read_bundle(out)


def test_target_options_accessor_checks_its_type(tmp_path: Path) -> None:
    from edgegate.bundle import Bundle

    with pytest.raises(BundleError, match="target_options in manifest.json is not an object"):
        _ = Bundle(tmp_path, {"target_options": "x"}).target_options


@pytest.mark.parametrize(
    "location, message",
    [("", "is empty"), ("a\x00b", "contains control characters"), ("a\nb", "contains control characters"),
     ("C:weights.bin", "leaves the bundle"), ("sub\\..\\..\\secret.bin", "leaves the bundle")],
)
def test_odd_external_locations_are_refused(bundle_dir: Path, parser: str, location: str, message: str) -> None:
    (bundle_dir / "model.onnx").write_bytes(_ext_model(location))
    with pytest.raises(BundleError, match=message) as info:
        check_onnx_external_data(bundle_dir / "model.onnx", bundle_dir)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------- destination


def test_check_destination(tmp_path: Path) -> None:
    check_destination(tmp_path / "new" / "deeper" / "b")  # missing parents are fine: write_bundle makes them
    write_bundle(tmp_path / "exists", {"a.bin": b"x"}, {})
    with pytest.raises(BundleError, match="exists already exists; pass --overwrite"):
        check_destination(tmp_path / "exists")
    check_destination(tmp_path / "exists", overwrite=True)
    (tmp_path / "plain").mkdir()  # --overwrite replaces only a bundle (tests/e2e/test_bad_inputs.py: the rest)
    with pytest.raises(BundleError, match="plain already exists and is not an edgegate bundle"):
        check_destination(tmp_path / "plain", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match=r"cannot write bundle .*file/b: .*file is not a directory"):
        check_destination(tmp_path / "file" / "b")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_check_destination_read_only(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    with pytest.raises(BundleError, match="is not writable"):
        check_destination(tmp_path / "ro" / "b")
    with pytest.raises(BundleError, match="Permission denied"):
        write_bundle(tmp_path / "ro" / "b", {"a.bin": b"x"}, {})
    assert _listing(tmp_path / "ro") == []


def test_location_that_is_not_utf8_is_refused(bundle_dir: Path, parser: str) -> None:
    model = onnx.load_model_from_string(_ext_model("ok.bin"))
    data = model.SerializeToString().replace(b"ok.bin", b"ok\xffbin")  # same length: framing stays valid
    (bundle_dir / "model.onnx").write_bytes(data)
    with pytest.raises(BundleError, match=r"location b'ok\\xffbin' of tensor 'w' is not valid UTF-8"):
        check_onnx_external_data(bundle_dir / "model.onnx", bundle_dir)


def test_wire_parser_ignores_varints_in_external_data_entries(bundle_dir: Path, parser: str) -> None:
    """A varint where a string belongs must not be taken for a length to allocate (bytes(2**42))."""
    model = onnx.load_model_from_string(_ext_model("ok.bin"))
    entry = model.graph.initializer[0].external_data[0]
    huge = b"\x18" + b"\xff" * 5 + b"\x7f"  # an unknown field 3, varint about 2**42
    entry.ParseFromString(entry.SerializeToString() + huge)  # protobuf keeps unknown fields
    data = model.SerializeToString()
    assert huge in data
    (bundle_dir / "model.onnx").write_bytes(data)
    assert check_onnx_external_data(bundle_dir / "model.onnx", bundle_dir) == ["ok.bin"]

"""The bad-input table: each bad input through the real CLI exits 2 with one line that names the problem.

Every case asserts exit code 2, exactly one stderr line starting ``edgegate: error:`` that contains
the case's needles (the file or tensor at fault, and what is wrong), no traceback, and no file left
behind: neither in the working directory nor in the temp directory.

Most cases call ``edgegate.cli.main`` in this process (fast: torch is imported once); there the
"one line" also means no warning or log record that a user's terminal would have shown. The cases
marked ``subprocess`` run ``python -m edgegate.cli`` exactly as a user does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from edgegate import zoo
from edgegate.cli import main

MODEL_CLASS = "edgegate.zoo.models:ThresholdMLP"


def _cli(*args: str, cwd: Path, limit_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limits() -> None:  # in the child: a real kernel-enforced file size limit (write() fails with EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, resource.RLIM_INFINITY))

    # ORT_DISABLE_TELEMETRY: onnxruntime (1.2x+) otherwise writes a telemetry session file into $TMPDIR when
    # imported (see SECURITY.md); the temp dir is checked for what edgegate leaves, so keep that out of it.
    env = {**os.environ, "COLUMNS": "200", "TMPDIR": str(cwd / "_tmp"), "ORT_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "edgegate.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600, preexec_fn=limits if limit_file_bytes else None)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained model (`edgegate zoo train`, as a user does) and one good bundle, shared by every case."""
    root = tmp_path_factory.mktemp("bad_inputs")
    r = _cli("zoo", "train", "threshold_gate", "-o", "m.pt", cwd=root)
    assert r.returncode == 0, r.stderr
    assert main(["export", str(root / "m.pt"), "-o", str(root / "good.edgegate")]) == 0
    return root


# ------------------------------------------------------------------------------------------ inputs


def _copy_model(a: Path, w: Path) -> str:
    shutil.copy(a / "m.pt", w / "m.pt")
    return "m.pt"


def _truncated(a: Path, w: Path) -> str:
    (w / "m.pt").write_bytes((a / "m.pt").read_bytes()[:1500])
    return "m.pt"


def _random_bytes(a: Path, w: Path) -> str:
    (w / "m.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return "m.pt"


def _empty(a: Path, w: Path) -> str:
    (w / "m.pt").write_bytes(b"")
    return "m.pt"


def _full_pickle(a: Path, w: Path) -> str:
    torch.save(zoo.build("threshold_gate"), w / "pickled.pt")  # loading it would run code
    return "pickled.pt"


def _torchscript_named_onnx(a: Path, w: Path) -> str:
    model = zoo.build("threshold_gate").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; this is only the hostile input
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 64), check_trace=False), str(w / "model.onnx"))
    return "model.onnx"


def _onnx_named_pt(a: Path, w: Path) -> str:
    shutil.copy(a / "good.edgegate" / "model.onnx", w / "model.pt")
    return "model.pt"


def _state_dict_only(a: Path, w: Path) -> str:
    torch.save(zoo.build("threshold_gate").state_dict(), w / "weights.pt")
    return "weights.pt"


def _foreign_class(a: Path, w: Path) -> str:
    raw = torch.load(a / "m.pt", weights_only=True)
    spec = json.loads(raw["spec"])
    raw["spec"] = json.dumps({**spec, "class": "mypkg.evil:Net"})
    torch.save(raw, w / "m.pt")
    return "m.pt"


def _huge_config(a: Path, w: Path) -> str:
    raw = torch.load(a / "m.pt", weights_only=True)
    spec = json.loads(raw["spec"])
    spec["config"] = {**spec["config"], "hidden": 10**11}  # would be hundreds of GB if built for real
    raw["spec"] = json.dumps(spec)
    torch.save(raw, w / "m.pt")
    return "m.pt"


def _bad_safetensors(a: Path, w: Path) -> str:
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": [' + b"[" * 40_000
    (w / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    return "m.safetensors"


def _zip_bomb(a: Path, w: Path) -> str:
    with zipfile.ZipFile(a / "m.pt") as src, zipfile.ZipFile(w / "m.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr("archive/data/99", b"\0" * (64 << 20), compress_type=zipfile.ZIP_DEFLATED)
    return "m.pt"


def _npz(name: str, **arrays) -> Callable[[Path, Path], str]:
    def make(a: Path, w: Path) -> str:
        _copy_model(a, w)
        np.savez(w / name, **arrays)
        return name

    return make


def _bytes_file(name: str, data: bytes) -> Callable[[Path, Path], str]:
    def make(a: Path, w: Path) -> str:
        _copy_model(a, w)
        (w / name).write_bytes(data)
        return name

    return make


def _bundle(damage: Callable[[Path, Path], None]) -> Callable[[Path, Path], str]:
    def make(a: Path, w: Path) -> str:
        shutil.copytree(a / "good.edgegate", w / "b.edgegate")
        damage(w / "b.edgegate", w)
        return "b.edgegate"

    return make


def _tamper(b: Path, w: Path) -> None:
    data = bytearray((b / "model.onnx").read_bytes())
    data[-1] ^= 1
    (b / "model.onnx").write_bytes(bytes(data))


def _set_file(b: Path, name: str, data: bytes) -> None:
    """Replace a file and fix up its manifest entry, as a hostile bundle author would."""
    (b / name).write_bytes(data)
    m = json.loads((b / "manifest.json").read_text())
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (b / "manifest.json").write_text(json.dumps(m))


def _external(location: str) -> Callable[[Path, Path], None]:
    def damage(b: Path, w: Path) -> None:
        (w / "secret.bin").write_bytes(b"\0" * 16)
        (b / "inlink.bin").symlink_to(b / "golden_io.npz")  # a link, though to a file inside the bundle
        t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=location)
        g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [t])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
        _set_file(b, "model.onnx", model.SerializeToString())

    return damage


def _golden_not_npz(b: Path, w: Path) -> None:
    _set_file(b, "golden_io.npz", b"PK\x03\x04 this is not a zip")


def _exists(a: Path, w: Path) -> str:
    _copy_model(a, w)
    (w / "out.edgegate").mkdir()
    return "m.pt"


def _parent_is_file(a: Path, w: Path) -> str:
    _copy_model(a, w)
    (w / "afile").write_text("not a directory")
    return "m.pt"


def _read_only_dir(a: Path, w: Path) -> str:
    _copy_model(a, w)
    (w / "ro").mkdir()
    (w / "ro").chmod(0o555)
    return "m.pt"


def _input_folder(a: Path, w: Path) -> str:
    (w / "s2").mkdir()
    shutil.copy(a / "m.pt", w / "s2" / "m.pt")
    return "s2/m.pt"


def _plain_dir(a: Path, w: Path) -> str:
    _copy_model(a, w)
    (w / "plaindir").mkdir()
    (w / "plaindir" / "notes.txt").write_text("the user's own file")
    return "m.pt"


def _beside(damage: Callable[[Path, Path], None] | None = None) -> Callable[[Path, Path], str]:
    """m.pt and a copy of the good bundle as b.edgegate (then damaged), to export over it."""

    def make(a: Path, w: Path) -> str:
        _copy_model(a, w)
        shutil.copytree(a / "good.edgegate", w / "b.edgegate")
        if damage:
            damage(w / "b.edgegate", w)
        return "m.pt"

    return make


def _link_to_bundle(b: Path, w: Path) -> None:
    b.rename(w / "real.edgegate")
    b.symlink_to(w / "real.edgegate")


# ------------------------------------------------------------------------------------------- table


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path, Path], str]  # (assets, workdir) -> name of the input it wrote
    args: tuple[str, ...]  # "{in}" is replaced by that name; paths are relative to the workdir
    needles: tuple[str, ...]
    subprocess: bool = False
    limit_file_bytes: int | None = None
    xfail: str = ""  # a known bug outside this test's reach, with what fixes it (strict: fails once fixed)


INT8 = ("export", "m.pt", "--quant", "int8", "-o", "out.edgegate", "--calib", "{in}")
EXPORT = ("export", "{in}", "-o", "out.edgegate")
BENCH = ("bench", "{in}", "--runs", "2", "--warmup", "0")


def _export_over(out: str) -> tuple[str, ...]:
    return ("export", "{in}", "-o", out, "--overwrite")


CASES = [
    # model files
    Case("truncated-checkpoint", _truncated, EXPORT, ("m.pt", "truncated or corrupt zip")),
    Case("random-bytes", _random_bytes, EXPORT, ("m.pt", "not a format edgegate recognizes")),
    Case("empty-model", _empty, EXPORT, ("m.pt", "is empty (0 bytes)")),
    Case("missing-model", lambda a, w: "nope.pt", EXPORT, ("nope.pt", "does not exist")),
    Case("full-pickle-needs-trust", _full_pickle, EXPORT, ("pickled.pt", "full pickle", "--trust-model"),
         subprocess=True),
    Case("torchscript-named-onnx", _torchscript_named_onnx, EXPORT, ("model.onnx", "TorchScript", "--trust-model")),
    Case("onnx-named-pt", _onnx_named_pt, EXPORT, ("model.pt", "is an ONNX model")),
    Case("state-dict-without-class", _state_dict_only, EXPORT, ("weights.pt", "plain state_dict", "--model")),
    Case("class-outside-edgegate", _foreign_class, EXPORT, ("m.pt", "mypkg.evil:Net", "outside edgegate")),
    Case("huge-config", _huge_config, EXPORT, ("m.pt", "do not fit", "100000000000")),
    Case("bad-safetensors-header", _bad_safetensors, ("export", "{in}", "--model", MODEL_CLASS),
         ("m.safetensors", "corrupt safetensors header")),
    Case("zip-bomb", _zip_bomb, EXPORT, ("m.pt", "zip bomb")),
    Case("inspect-truncated", _truncated, ("inspect", "{in}"), ("m.pt", "truncated or corrupt zip")),
    # calibration data
    Case("calib-nan", _npz("c.npz", x=np.full((8, 64), np.nan, np.float32)), INT8, ("c.npz", "'x'", "NaN/Inf")),
    Case("calib-inf", _npz("c.npz", x=np.full((8, 64), np.inf, np.float32)), INT8, ("c.npz", "'x'", "NaN/Inf")),
    Case("calib-empty", _npz("c.npz", x=np.zeros((0, 64), np.float32)), INT8, ("c.npz", "'x'", "is empty")),
    Case("calib-wrong-dtype", _npz("c.npz", x=np.zeros((8, 64), np.float64)), INT8, ("'x'", "float64", "float32")),
    Case("calib-wrong-shape", _npz("c.npz", x=np.zeros((8, 32), np.float32)), INT8, ("c.npz", "'x'", "(N, 64)")),
    Case("calib-missing-input", _npz("c.npz", y=np.zeros((8, 64), np.float32)), INT8,
         ("c.npz", "missing input 'x'")),
    Case("calib-object-array", _npz("c.npz", x=np.array([{"a": 1}] * 8, dtype=object)), INT8,
         ("c.npz", "'x'", "object")),
    Case("calib-not-npz", _bytes_file("c.npz", b"x,y\n1,2\n"), INT8, ("c.npz", "not an .npz")),
    Case("calib-corrupt-zip", _bytes_file("c.npz", b"PK\x03\x04" + b"\0" * 60), INT8, ("c.npz", "corrupt .npz")),
    Case("calib-unknown-dataset", lambda a, w: _copy_model(a, w) and "imagenet", INT8,
         ("imagenet", "neither a built-in dataset")),
    # command line
    Case("unknown-target", _copy_model, ("export", "m.pt", "--target", "fpga9000", "-o", "out.edgegate"),
         ("unknown target 'fpga9000'",)),
    Case("unknown-option", _copy_model, ("export", "m.pt", "--frobnicate"), ("unrecognized arguments: --frobnicate",),
         subprocess=True),
    Case("unknown-command", lambda a, w: "", ("deploy",), ("invalid choice: 'deploy'",)),
    Case("unknown-quant", _copy_model, ("export", "m.pt", "--quant", "int4"), ("--quant", "invalid choice: 'int4'")),
    Case("target-option-not-key-value", _copy_model, ("export", "m.pt", "-O", "threads", "-o", "out.edgegate"),
         ("--target-option 'threads'", "KEY=VALUE")),
    Case("target-option-unknown-key", _copy_model, ("export", "m.pt", "-O", "warp=9", "-o", "out.edgegate"),
         ("cpu", "--target-option", "warp")),
    Case("batch-zero", _copy_model, ("export", "m.pt", "--batch", "0"), ("--batch", "0 must be >= 1")),
    Case("lowrank-not-int", _copy_model, ("export", "m.pt", "--lowrank", "two"), ("--lowrank", "'two'")),
    Case("bench-negative-runs", _bundle(lambda b, w: None), ("bench", "{in}", "--runs", "-5"),
         ("--runs", "-5 must be >= 1")),
    Case("mistyped-command", lambda a, w: "", ("exprot",), ("invalid choice: 'exprot'", "did you mean 'export'?")),
    Case("mistyped-quant", _copy_model, ("export", "m.pt", "--quant", "int9"), ("did you mean 'int8'?",)),
    # bundles
    Case("bundle-tampered", _bundle(_tamper), BENCH, ("b.edgegate", "model.onnx", "sha256"), subprocess=True),
    Case("bundle-no-manifest", _bundle(lambda b, w: (b / "manifest.json").unlink()), BENCH,
         ("b.edgegate", "no manifest.json")),
    Case("bundle-manifest-not-json", _bundle(lambda b, w: (b / "manifest.json").write_text("{oops")), BENCH,
         ("manifest.json", "not valid JSON")),
    Case("bundle-missing-file", _bundle(lambda b, w: (b / "golden_io.npz").unlink()), BENCH,
         ("golden_io.npz", "missing")),
    Case("bundle-external-data-dotdot", _bundle(_external("../secret.bin")), BENCH,
         ("'../secret.bin'", "tensor 'w'", "leaves the bundle")),
    Case("bundle-external-data-absolute", _bundle(_external("/etc/passwd")), BENCH,
         ("'/etc/passwd'", "is absolute")),
    Case("bundle-external-data-link", _bundle(_external("inlink.bin")), ("inspect", "{in}"),
         ("'inlink.bin'", "link")),
    Case("bundle-golden-not-npz", _bundle(_golden_not_npz), BENCH, ("golden_io.npz", "corrupt .npz")),
    Case("bench-not-a-bundle", _copy_model, ("bench", "m.pt"), ("m.pt", "not a directory")),
    # output
    Case("output-exists", _exists, EXPORT, ("out.edgegate", "already exists", "not an edgegate bundle")),
    Case("output-is-a-bundle", _beside(), ("export", "m.pt", "-o", "b.edgegate"),
         ("b.edgegate", "already exists", "pass --overwrite")),
    # --overwrite replaces only a verified edgegate bundle holding nothing else; each of these keeps every file
    Case("overwrite-plain-dir", _plain_dir, _export_over("plaindir"), ("plaindir", "not an edgegate bundle")),
    Case("overwrite-input-folder", _input_folder, ("export", "{in}", "-o", "s2", "--overwrite"),
         ("s2 holds the input s2/m.pt", "never replaces")),
    Case("overwrite-cwd", _copy_model, _export_over("."), ("-o .", "the current directory"), subprocess=True),
    Case("overwrite-parent", _copy_model, _export_over(".."), ("-o ..", "the current directory or contains it")),
    Case("overwrite-file", _parent_is_file, _export_over("afile"), ("afile", "is a file, not a bundle directory")),
    Case("overwrite-link", _beside(_link_to_bundle), _export_over("b.edgegate"), ("b.edgegate", "is a link")),
    Case("overwrite-bundle-holding-more", _beside(lambda b, w: (b / "notes.txt").write_text("mine")),
         _export_over("b.edgegate"), ("b.edgegate", "'notes.txt'", "not part of the bundle")),
    Case("overwrite-tampered-bundle", _beside(_tamper), _export_over("b.edgegate"),
         ("b.edgegate", "does not verify as an edgegate bundle")),
    Case("output-parent-is-a-file", _parent_is_file, ("export", "{in}", "-o", "afile/out.edgegate"),
         ("afile", "not a directory")),
    Case("output-read-only-dir", _read_only_dir, ("export", "{in}", "-o", "ro/out.edgegate"), ("ro", "not writable")),
    Case("bench-json-unwritable", _bundle(lambda b, w: None), BENCH + ("--json", "nodir/r.json"),
         ("nodir/r.json", "No such file or directory")),
    # The first file an export writes is a scratch copy of the model for the ONNX checker, in TMPDIR.
    Case("file-size-limit", _copy_model, EXPORT, ("File too large", "scratch copy", "_tmp/edgegate-check-", "TMPDIR"),
         subprocess=True, limit_file_bytes=20_000),
]


def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _in_process(args: list[str], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own handler; give pytest's back
    try:
        with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            try:
                code = main(args)
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    err = capsys.readouterr().err
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # Python's defaults
    shown = [w for w in seen if not issubclass(w.category, hidden)]
    # On a terminal each of these would have been another stderr line.
    extra = [f"{w.category.__name__}: {w.message}" for w in shown] + [r.getMessage() for r in caplog.records]
    return code, err + "".join(f"{line}\n" for line in extra)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(reason=c.xfail, strict=True)) if c.xfail else c for c in CASES],
    ids=[c.id for c in CASES],
)
def test_bad_input(case: Case, assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    if case.id == "output-read-only-dir" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    work, tmp = tmp_path / "work", tmp_path / "work" / "_tmp"
    tmp.mkdir(parents=True)
    name = case.make(assets, work) or ""
    args = [a.replace("{in}", name) for a in case.args]
    before = _tree(work)
    if case.subprocess:
        r = _cli(*args, cwd=work, limit_file_bytes=case.limit_file_bytes)
        code, err = r.returncode, r.stderr
    else:
        monkeypatch.chdir(work)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        code, err = _in_process(args, caplog, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("edgegate: error: ") and "Traceback" not in err, err
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert _tree(work) == before, "files left behind"
    assert not any(tmp.iterdir()), "temp files left behind"


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert sum(c.id.startswith("overwrite-") for c in CASES) >= 8


def test_overwrite_replaces_a_bundle(assets: Path, tmp_path: Path) -> None:
    """The one thing --overwrite does: replace a verified bundle (here one of another model) in place."""
    shutil.copytree(assets / "good.edgegate", tmp_path / "b.edgegate")
    save_meta = json.loads((tmp_path / "b.edgegate" / "manifest.json").read_text())
    assert main(["export", str(assets / "m.pt"), "-o", str(tmp_path / "b.edgegate"), "--overwrite",
                 "--batch", "2"]) == 0
    m = json.loads((tmp_path / "b.edgegate" / "manifest.json").read_text())
    assert m["export"]["batch"] == 2 and save_meta["export"]["batch"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.edgegate"]  # no old copy or temp dir left

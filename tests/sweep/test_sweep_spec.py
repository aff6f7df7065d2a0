"""Sweep specs without Ray: validation (one line naming the key), expansion into cells, content keys,
the Pareto front, the output-folder rules, and the one-line answer when Ray is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgegate.sweep import SweepError, expand, load_spec, pareto_front
from edgegate.sweep.report import render_text
from edgegate.sweep.store import check_out_dir, hash_files, key_of


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "a.pt").write_bytes(b"model a")
    (tmp_path / "b.pt").write_bytes(b"model b")
    return tmp_path


def spec_at(folder: Path, text: str) -> Path:
    path = folder / "spec.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ('targets = ["cpu"]', "key 'models' is missing"),
    ('models = ["a.pt"]\nquant = ["int4"]', "key 'quant' has 'int4'; use one of fp32, fp16, int8, ternary"),
    ('models = ["a.pt"]\nmodle = 1', "unknown key 'modle'"),
    ('models = ["a.pt", 3]', "key 'models' must be a string or a list of strings, not 3"),
    ('models = ["missing.pt"]', "models entry 'missing.pt' does not exist"),
    ('models = []', "key 'models' is an empty list"),
    ('models = ["a.pt"]\ntargets = ["gpu9"]', "key 'targets': unknown target 'gpu9'"),
    ('models = ["a.pt"]\nobserver = ["mse"]', "key 'observer' applies to quant int8 only"),
    ('models = ["a.pt"]\nquant = ["int8"]\nobserver = ["max"]', "key 'observer' has 'max'"),
    ('models = ["a.pt"]\nquant = ["ternary"]\nlowrank = [-1]', "key 'lowrank' must be an int >= 0"),
    ('models = ["a.pt"]\n[options]\ntrt = { fp16 = true }', "key 'options.trt' names a target that is not in"),
    ('models = ["a.pt"]\n[options]\ncpu = { x = [[1]] }', "key 'options.cpu.x' must be a string, number or boolean"),
    ('models = ["a.pt"]\ndata = "nosuch"', "key 'data' = 'nosuch' is neither a built-in dataset"),
    ('models = ["a.pt"]\n[bench]\nruns = 0', "key 'bench.runs' = 0 is not valid; give a whole number >= 1"),
    ('models = ["a.pt"]\n[bench]\nrepeat = 3', "unknown key 'bench.repeat' (known: runs, warmup, threads)"),
    ('models = ["a.pt"]\n[ray]\ncpus_per_cell = 0', "key 'ray.cpus_per_cell' = 0 is not valid; give a number"),
    ('models = ["a.pt"]\ndevice = "http://127.0.0.1:8000"', "key 'device' must be a table"),
    ('models = ["a.pt"]\n[device]\nurl = "http://127.0.0.1:8000"', "key 'device.token_file' is missing"),
    ('models = ["a.pt"]\n[device]\nurl = "ftp://h:1"\ntoken_file = "t"', "key 'device': device URL 'ftp://h:1'"),
    ('models = ["a.pt"]\n[device]\nurl = "http://h:1"\ntoken_file = "none"', "key 'device': token file"),
    ('models = ["a.pt"]\n[device]\nurl = "http://h:1"\ntoken_file = "t"\nname = 1', "unknown key 'device.name'"),
    ('models = ["a.pt"\n', "is not valid TOML"),
])
def test_bad_spec_is_refused_in_one_line_naming_the_key(folder: Path, text: str, message: str) -> None:
    with pytest.raises(SweepError) as e:
        load_spec(spec_at(folder, text))
    assert message in str(e.value)
    assert str(folder / "spec.toml") in str(e.value)
    assert "\n" not in str(e.value)


def test_expansion_collapses_axes_a_scheme_ignores(folder: Path) -> None:
    spec = load_spec(spec_at(folder, """
models = ["a.pt", "b.pt"]
targets = ["cpu", "snn"]
quant = ["fp32", "int8", "ternary", "int8"]
observer = ["minmax", "mse"]
calibration = ["gate_aware", "naive"]
lowrank = [0, 4]
calib = "digits"
[options]
snn = { timesteps = [8, 16], nir = false }
"""))
    cells = expand(spec)
    # per model: cpu fp32 1 + int8 2x2 + ternary 2 = 7; snn the same x 2 timesteps = 14 -> 21 per model
    assert len(cells) == 42
    assert len(set(cells)) == 42
    fp32 = [c for c in cells if c.quant == "fp32"]
    assert {(c.observer, c.calibration, c.lowrank) for c in fp32} == {(None, None, 0)}
    assert {c.lowrank for c in cells if c.quant == "ternary"} == {0, 4}
    assert {c.lowrank for c in cells if c.quant != "ternary"} == {0}
    snn = [c for c in cells if c.target == "snn"]
    assert {dict(c.options)["timesteps"] for c in snn} == {"8", "16"}
    assert {dict(c.options)["nir"] for c in snn} == {"false"}  # TOML booleans as the -O strings targets parse
    # Calibration data reaches quantized cells and the snn target (threshold balancing) only.
    assert {c.calib for c in cells if c.target == "cpu" and c.quant == "fp32"} == {None}
    assert {c.calib for c in cells if c.target == "snn"} == {"digits"}
    assert cells[0].name == "a/cpu/fp32"
    int8 = next(c for c in cells if c.quant == "int8" and c.target == "snn")
    assert int8.name == "a/snn/int8/minmax/gate_aware/nir=false/timesteps=8"


def test_key_follows_content_not_names(folder: Path) -> None:
    (folder / "copy.pt").write_bytes((folder / "a.pt").read_bytes())
    spec = load_spec(spec_at(folder, 'models = ["a.pt", "copy.pt", "b.pt"]\nquant = ["fp32", "int8"]'))
    shas = hash_files(spec)
    keys = [key_of(c, spec, shas) for c in expand(spec)]
    assert len(keys) == 6 and all(len(k) == 64 for k in keys)
    assert keys[0] == keys[2] and keys[1] == keys[3]  # a.pt and its copy: the same cells
    assert len({keys[0], keys[1], keys[4], keys[5]}) == 4
    more_runs = load_spec(spec_at(folder, 'models = ["a.pt"]\nquant = ["fp32"]\n[bench]\nruns = 7'))
    assert key_of(expand(more_runs)[0], more_runs, hash_files(more_runs)) != keys[0]  # bench settings count
    (folder / "a.pt").write_bytes(b"model a, retrained")
    assert key_of(expand(spec)[0], spec, hash_files(spec)) != keys[0]


def test_spec_round_trips_through_sweep_json(folder: Path) -> None:
    from edgegate.sweep import SweepSpec

    spec = load_spec(spec_at(folder, 'models = ["a.pt"]\nquant = ["int8"]\nobserver = ["mse", "minmax"]\n'
                                     '[options]\ncpu = { a = [1, 2] }\n[ray]\nmax_retries = 5'))
    again = SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict())), "sweep.json")
    assert again == spec
    assert expand(again) == expand(spec)


def test_pareto_front() -> None:
    latency = [1.0, 2.0, 3.0, 2.0, 1.0, 4.0]
    quality = [0.90, 0.95, 0.94, 0.95, 0.80, 0.99]
    # 3.0/0.94 is beaten by 2.0/0.95; 1.0/0.80 by 1.0/0.90; the two 2.0/0.95 tie and both stay.
    assert pareto_front(latency, quality) == [True, True, False, True, False, True]
    assert pareto_front([], []) == []


def test_table_marks_front_and_errors() -> None:
    def row(key, name, acc, ms, status="ok"):
        return {"key": key, "name": name, "cell": {"model": "m.pt"}, "status": status, "cached": key == "c",
                "error": None if status == "ok" else "export: boom", "metrics": {"accuracy": acc},
                "reference": {"accuracy": 0.9}, "latency": {"median_ms": ms, "p99_ms": 2 * ms},
                "bundle_bytes": 2048, "export_s": 1.5, "node": {"ip": "127.0.0.1"}}

    sweep = {"rows": [row("a", "m/cpu/fp32", 0.9, 1.0), row("b", "m/cpu/int8", 0.91, 0.5),
                      row("c", "m/cpu/int8/mse", 0.85, 0.7), row("d", "m/snn/fp32", None, 1.0, "error")]}
    sweep["rows"][3].update(metrics={}, latency=None, bundle_bytes=None, export_s=None, node=None)
    lines = render_text(sweep).splitlines()
    assert lines[0].split() == ["#", "cell", "status", "accuracy", "vs", "float", "gate", "agr", "median", "ms", "p99",
                                "ms", "size", "KiB", "export", "s", "node", "cached", "front"]
    assert lines[2].split() == ["1", "m/cpu/fp32", "ok", "0.9000", "+0.0000", "-", "1.0000", "2.0000", "2.0", "1.50",
                                "127.0.0.1", "no", "-"]
    assert lines[3].split()[-1] == "*" and lines[3].split()[4] == "+0.0100"
    assert lines[4].split()[-2:] == ["yes", "-"]
    assert lines[5].split()[:5] == ["4", "m/snn/fp32", "error:", "export:", "boom"]


def test_out_dir_must_be_new_empty_or_a_sweep(tmp_path: Path) -> None:
    check_out_dir(tmp_path / "new")
    check_out_dir(tmp_path)  # empty
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="is not empty and holds no sweep.json"):
        check_out_dir(tmp_path)
    (tmp_path / "sweep.json").write_text('{"format": "edgegate.compare", "version": 1}')
    with pytest.raises(SweepError, match="is not an edgegate.sweep v1 report"):
        check_out_dir(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("missing, message", [
    ("ray", "edgegate sweep runs on Ray; pip install 'edgegate[cluster]'"),
    ("onnx", "`edgegate sweep` needs onnx, which is not installed here: pip install 'edgegate[compile]'"),
])
def test_cli_without_an_extra_says_what_to_install(folder: Path, missing: str, message: str) -> None:
    spec = spec_at(folder, 'models = ["a.pt"]')
    # A module set to None in sys.modules makes its import raise ImportError, as on an install without it.
    code = (f"import sys; sys.modules[{missing!r}] = None; from edgegate.cli import main; "
            f"sys.exit(main(['sweep', {str(spec)!r}, '-o', {str(folder / 'out')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"edgegate: error: {message}"
    assert not (folder / "out").exists()  # refused before anything was written


def test_cli_resume_needs_a_sweep_and_flags_conflict(folder: Path) -> None:
    from tests._cli import edgegate

    r = edgegate("sweep", "--resume", "-o", "nothing", cwd=folder)
    assert r.returncode == 2
    assert r.stderr.strip() == ("edgegate: error: --resume: nothing holds no sweep.json; give the sweep's "
                                "SPEC.toml to start it")
    spec_at(folder, 'models = ["a.pt"]')
    r = edgegate("sweep", "spec.toml", "-o", "out", "--num-cpus", "1", "--ray-address", "127.0.0.1:1", cwd=folder)
    assert r.returncode == 2
    assert "give one of --num-cpus and --ray-address" in r.stderr
    r = edgegate("sweep", "spec.toml", "-o", "out", "--ray-address", "127.0.0.1:1", cwd=folder)
    assert r.returncode == 2
    assert r.stderr.startswith("edgegate: error: cannot reach a Ray head at 127.0.0.1:1")
    assert not (folder / "out").exists()


def test_sample_spec_in_docs_expands_to_eight_cells(tmp_path: Path) -> None:
    sample = Path(__file__).parents[2] / "docs" / "sweep-example.toml"
    (tmp_path / "sweep-example.toml").write_text(sample.read_text())
    (tmp_path / "early_exit.pt").write_bytes(b"stands in for the trained checkpoint")
    spec = load_spec(tmp_path / "sweep-example.toml")
    cells = expand(spec)
    assert [c.name for c in cells] == [
        "early_exit/cpu/fp32",
        *(f"early_exit/cpu/int8/{o}/{c}" for o in ("minmax", "percentile", "mse") for c in ("gate_aware", "naive")),
        "early_exit/cpu/ternary"]
    assert (spec.bench.runs, spec.bench.threads, spec.ray.max_retries) == (200, 1, 2)

"""The runtime side runs without the compile stack: `edgegate bench` on a device with numpy + onnxruntime.

This is the CI proof of ``pip install "edgegate[runtime]"``: the bundle is made here (with onnx, or
torch for a zoo bundle); a child Python then blocks ``torch``, ``onnx``, ``onnxscript``, ``brevitas``,
``matplotlib`` and ``rich`` with a ``sys.meta_path`` finder installed before anything else is imported
(a blocked import fails as a missing module does), runs the bench and every CLI command, and reports
which of those modules got into ``sys.modules``. Commands that need the compile extra must say so in one
line and exit 2; ``targets``, ``inspect BUNDLE`` and ``bench`` must work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("onnx")  # only to build the bundle in this process

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_bench import _make_bundle  # noqa: E402

BLOCKED = ("torch", "onnx", "onnxscript", "brevitas", "matplotlib", "rich")

CHILD = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: runtime-only device)", name=name)
            return None

    sys.meta_path.insert(0, Block())

    import json
    from edgegate.benchmark import BenchConfig, bench
    from edgegate.reports.bench_text import render_text

    report = bench(sys.argv[1], BenchConfig(runs=30, warmup=3))
    text = render_text(report)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({{"report": report.to_dict(), "text": text, "loaded": loaded}}))
    """
)


def _run_child(bundle: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(blocked=BLOCKED), str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_runs_without_torch_or_onnx(tmp_path: Path) -> None:
    bundle = _make_bundle(tmp_path / "bundle", exits=True)
    out = _run_child(bundle)
    assert out["loaded"] == []  # neither torch nor onnx (nor their friends) were imported
    report = out["report"]
    assert report["format"] == "edgegate.bench" and report["runs"] == 30
    assert sum(report["exits"]["counts"]) == 30
    assert "Latency (ms)" in out["text"]


def test_blocker_blocks() -> None:
    """The finder really stops an import, so the test above can fail."""
    code = CHILD.format(blocked=BLOCKED).split("import json")[0] + "import onnx\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "No module named 'onnx' (blocked" in proc.stderr


CLI_CHILD = CHILD.split("import json")[0] + textwrap.dedent(
    """
    import json
    from edgegate.cli import main

    rc = main(["bench", *sys.argv[1:]])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({{"rc": rc, "loaded": loaded}}))
    """
)


def test_cli_bench_of_a_zoo_moe_bundle_without_torch(zoo_model, tmp_path: Path) -> None:
    """`edgegate bench DIR --json` on a real MoE zoo bundle: golden check, route histogram, no torch."""
    from edgegate import zoo
    from edgegate.loading import save
    from edgegate.pipeline import ExportConfig, run_export

    model, metrics = zoo_model("moe")
    save(model, tmp_path / "moe.pt", meta=zoo.checkpoint_meta("moe", metrics, 0))
    bundle = run_export(tmp_path / "moe.pt", tmp_path / "moe.edgegate", ExportConfig())
    out_json = tmp_path / "bench.json"
    args = [str(bundle), "--runs", "30", "--warmup", "2", "--json", str(out_json)]
    proc = subprocess.run([sys.executable, "-c", CLI_CHILD.format(blocked=BLOCKED), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *text, last = proc.stdout.strip().splitlines()
    assert json.loads(last) == {"rc": 0, "loaded": []}
    assert any(line.startswith("Golden check : passed") for line in text)
    assert any(line.startswith("Routes moe.router: 0: ") and "[route_indices]" in line for line in text)
    report = json.loads(out_json.read_text())
    (routes,) = report["routes"]
    assert routes["output"] == "route_indices" and len(routes["counts"]) == 4
    assert sum(routes["counts"]) == 30 * 2  # 30 runs of batch 1, top-2


COMMANDS_CHILD = CHILD.split("import json")[0] + textwrap.dedent(
    """
    import contextlib, io, json
    from edgegate.cli import main

    results = []
    for args in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(args)
            except SystemExit as e:
                rc = e.code
        results.append({{"args": args, "rc": rc, "out": out.getvalue(), "err": err.getvalue()}})
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({{"results": results, "loaded": loaded}}))
    """
)


def test_every_command_works_or_names_the_extra(int8_export, tmp_path: Path) -> None:
    """The CLI on a runtime-only device: device commands work, the others are one line naming the extra."""
    work = int8_export.cwd
    bundle, model = str(work / "int8.edgegate"), str(work / "model.pt")
    out = str(tmp_path / "x.edgegate")
    commands = [["targets"], ["targets", "--json"], ["inspect", bundle], ["inspect", bundle, "--json"],
                ["bench", bundle, "--runs", "30", "--warmup", "2"],
                ["export", model, "-o", out], ["compare", model, bundle, "--data", "clusters"], ["zoo", "list"],
                ["zoo", "train", "early_exit", "-o", str(tmp_path / "m.pt")], ["inspect", model],
                ["inspect", f"{bundle}/model.onnx"]]
    proc = subprocess.run([sys.executable, "-c", COMMANDS_CHILD.format(blocked=BLOCKED), json.dumps(commands)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    targets, targets_json, inspect, inspect_json, bench, *refused = got["results"]
    for r in (targets, targets_json, inspect, inspect_json, bench):
        assert (r["rc"], r["err"]) == (0, ""), r
    assert targets["out"].splitlines()[2].split()[:3] == ["cpu", "yes", "yes"]
    assert {t["target"]: t["runs"] for t in json.loads(targets_json["out"])}["cpu"] is True
    lines = inspect["out"].splitlines()
    for label, needle in [("Quantization", "int8 (asymmetric form), gate-aware calibration on clusters"),
                          ("Fidelity", "top-1 agreement 0."),
                          ("Gate fidelity", "ExitMLP (whole model): exit agreement"),
                          ("Kept float", "heads.0 (exit head 0)"),
                          ("Files", "model.onnx"), ("ONNX ops", "need onnx: pip install 'edgegate[compile]'")]:
        assert any(line.startswith(f"{label:<13}: ") and needle in line for line in lines), (label, inspect["out"])
    assert "(feeds a gate decision; kept float for gate fidelity)" in inspect["out"]  # the search's promotion
    info = json.loads(inspect_json["out"])
    assert info["quant"]["fidelity"]["samples"] > 0 and info["onnx"] is None
    assert "Golden check : passed" in bench["out"]
    needs = [("export", "onnx"), ("compare", "onnx"), ("zoo list", "torch"), ("zoo train", "torch"),
             ("inspect", "torch"), ("inspect", "onnx")]  # a model file needs torch, an .onnx file onnx
    for r, (command, module) in zip(refused, needs, strict=True):
        assert r["rc"] == 2 and r["out"] == "", r
        assert r["err"] == (f"edgegate: error: `edgegate {command}` needs {module}, which is not installed "
                            "here: pip install 'edgegate[compile]'\n"), r
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written by the refused commands

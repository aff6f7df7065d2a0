"""The runtime side runs without the compile stack: `edgegate bench` on a device with numpy + onnxruntime.

This is the CI proof of ``pip install "edgegate[runtime]"``: the bundle is made here (with onnx, or
torch for a zoo bundle); a child Python then blocks ``torch``, ``onnx``, ``onnxscript``, ``brevitas``
and ``matplotlib`` with a ``sys.meta_path`` finder installed before anything else is imported, benches
the bundle (API or CLI), and reports which of those modules got into ``sys.modules``.
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

BLOCKED = ("torch", "onnx", "onnxscript", "brevitas", "matplotlib")

CHILD = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: runtime-only device")
            return None

    sys.meta_path.insert(0, Block())

    import json
    from edgegate.benchmark import BenchConfig, bench, render_text

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
    assert proc.returncode != 0 and "onnx is blocked" in proc.stderr


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

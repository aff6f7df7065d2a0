"""The public API of ``edgegate``: one lazily imported function per pipeline stage."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import edgegate
from edgegate import targets
from edgegate.errors import TargetError

# In a fresh interpreter: import every edgegate module (no module skipped silently), then check that each
# public name is still the documented function, then run `edgegate.export` and `edgegate.quantize` for real.
IMPORT_ALL = textwrap.dedent(
    """
    import importlib, importlib.util, json, pkgutil, sys
    from pathlib import Path

    import edgegate

    def fail(name):  # walk_packages ignores a package that fails to import unless told otherwise
        raise ImportError(f"cannot import package {name}")

    imported, skipped = [], {}
    for m in pkgutil.walk_packages(edgegate.__path__, "edgegate.", onerror=fail):
        if m.name == "edgegate.cli.__main__":  # importing it runs the CLI (`python -m edgegate.cli`)
            skipped[m.name] = "runs the CLI when imported"
            continue
        try:
            importlib.import_module(m.name)
        except ModuleNotFoundError as e:  # allowed only for a dependency that is not installed here
            if importlib.util.find_spec(e.name.split(".")[0]) is not None:
                raise
            skipped[m.name] = f"{e.name} is not installed"
            continue
        imported.append(m.name)

    api = {}
    for name, (module, attr) in edgegate._API.items():
        value = getattr(edgegate, name)
        api[name] = {"callable": callable(value), "is_documented": value is getattr(sys.modules[module], attr),
                     "module": str(getattr(value, "__module__", type(value).__name__)),
                     "name": getattr(value, "__name__", None)}

    from edgegate import zoo
    from edgegate.loading import save

    work = Path(sys.argv[1])
    model = zoo.build("threshold_gate")  # seeded random weights: enough to export
    save(model, work / "m.pt", meta=zoo.checkpoint_meta("threshold_gate", {}, 0))
    bundle = edgegate.export(work / "m.pt", out=work / "m.edgegate")
    qmodel, layers = edgegate.quantize(model)
    print(json.dumps({"imported": imported, "skipped": skipped, "api": api, "all": edgegate.__all__,
                      "bundle": edgegate.read_bundle(bundle).target, "quant_layers": sorted(layers)}))
    """
)


def test_every_module_imports_and_the_api_stays_the_documented_functions(tmp_path):
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    modules = set(out["imported"]) | set(out["skipped"])
    # Every subpackage whose name could shadow the API was imported before the API was looked up.
    for name in ("edgegate.nn", "edgegate.gates", "edgegate.quantization", "edgegate.onnx_export",
                 "edgegate.benchmark", "edgegate.comparison", "edgegate.pipeline", "edgegate.cli.export"):
        assert name in out["imported"], name
    assert len(modules) >= 60 and set(out["skipped"]) <= {"edgegate.cli.__main__"} | {
        m for m, why in out["skipped"].items() if why.endswith("is not installed")}
    assert out["all"] == [*edgegate._API, "__version__"]
    for name, (module, attr) in edgegate._API.items():
        got = out["api"][name]  # a function, not a module of the same name
        assert got["callable"] and got["is_documented"] and got["name"] == attr, (name, got)
        assert got["module"] == module or got["module"].startswith(module + "."), (name, got)
    assert out["bundle"] == "cpu" and (tmp_path / "m.edgegate" / "manifest.json").is_file()
    assert out["quant_layers"] == ["fc1", "fc2"]


def test_every_public_name_resolves():
    for name in edgegate.__all__:
        assert getattr(edgegate, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        edgegate.nope  # noqa: B018


def test_import_edgegate_pulls_in_neither_torch_nor_onnx():
    code = ("import sys, edgegate; edgegate.read_bundle; edgegate.bench; "
            "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stages_chain_through_the_api(zoo_model):
    model, _ = zoo_model("threshold_gate")
    gates = edgegate.find_gates(model)
    assert len(gates) >= 1
    x = torch.rand(8, 64)
    proto = edgegate.export_onnx(model, x, "x")
    artifact = edgegate.compile(proto, "cpu")
    with targets.get("cpu").load(artifact) as runner:
        (name,) = [n for n in runner.output_names if n == "logits"] or runner.output_names[:1]
        got = runner.run({"x": x.numpy()})[name]
    with torch.no_grad():
        want = model(x)
    want = want[0] if isinstance(want, tuple) else want
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_compile_names_the_unknown_target():
    with pytest.raises(TargetError, match="unknown target 'nope'"):
        edgegate.compile(None, "nope")

"""What the end-to-end tests share: the README's model, trained once by the real CLI, and its int8 bundle."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests._cli import edgegate


@pytest.fixture(scope="session")
def early_exit_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`edgegate zoo train early_exit -o model.pt`, as in the README (copy it before writing beside it)."""
    work = tmp_path_factory.mktemp("early_exit")
    r = edgegate("zoo", "train", "early_exit", "-o", "model.pt", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote model.pt (")
    return work / "model.pt"


@pytest.fixture(scope="session")
def int8_export(early_exit_model: Path, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    """`edgegate export model.pt --quant int8 --calib clusters -O latency_aware=false -o int8.edgegate` in a pipe;
    ``.cwd`` is its folder. latency_aware=false: the tests check the integer lowering itself, not which regions
    this CPU runs faster in float."""
    work = tmp_path_factory.mktemp("int8")
    shutil.copy(early_exit_model, work / "model.pt")
    r = edgegate("export", "model.pt", "--quant", "int8", "--calib", "clusters", "-O", "latency_aware=false",
                 "-o", "int8.edgegate", cwd=work)
    assert r.returncode == 0, r.stderr
    r.cwd = work  # type: ignore[attr-defined]
    return r

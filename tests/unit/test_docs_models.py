"""``docs/models.md`` is what the registries generate: it cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgegate.convert import converters
from edgegate.convert.__main__ import main
from edgegate.convert.docs import markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_docs_models_md_is_generated_from_the_registry():
    assert DOC.read_text(encoding="utf-8") == markdown(), (
        "docs/models.md is out of date: run `python -m edgegate.convert --write docs/models.md`")


def test_every_registered_class_has_a_row():
    text = markdown()
    for path, info in converters().items():
        row = next(line for line in text.splitlines() if f"`{path.split(':')[1]}`" in line)
        assert (info.refusal or info.becomes) in row.replace("\\|", "|")
    assert "| Phi-MoE | `PhimoeSparseMoeBlock`" in text and "EarlyExitNet.wrap" in text


def test_the_module_entry_point(tmp_path, capsys):
    out = tmp_path / "models.md"
    assert main(["--write", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == markdown()
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "give --markdown or --write PATH" in capsys.readouterr().err
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown()

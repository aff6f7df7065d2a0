"""What the CLI prints, read as a user reads it: on a terminal and through a pipe.

Plain-text tables (no box drawing, never wrapped at the terminal width), the same on a terminal as in
a pipe; ``--json`` for reports; ``inspect`` of a quantized bundle as a readable summary; ``export``
ending with its steps in run order and the fidelity; ``bench`` timing a budget long enough for a stable
median, its snn lines explained; help texts with defaults; a mistyped command answered with the closest.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest

from edgegate.cli import build_parser, main
from tests._cli import edgegate
from tests.e2e._tty import on_terminal, screen_lines

BOX = re.compile("[\u2500-\u257f]")  # box-drawing characters
STEPS = ["import", "load", "convert", "find_gates", "load_data", "calibrate", "export_onnx", "check", "compile",
         "golden", "write_bundle"]


def _labelled(text: str) -> dict[str, list[str]]:
    """``Label        : value`` lines -> {label: [values]} (continuation lines join their label)."""
    out: dict[str, list[str]] = {}
    label = ""
    for line in text.splitlines():
        if len(line) > 14 and line[13:15] == ": ":
            label = line[:13].strip() or label
            out.setdefault(label, []).append(line[15:])
    return out


def test_export_ends_with_steps_in_run_order_and_fidelity(int8_export) -> None:
    text = int8_export.stdout
    assert not BOX.search(text) and "\x1b" not in text and int8_export.stderr == ""  # a pipe: no live status
    lines = text.splitlines()
    assert lines[0].startswith("wrote int8.edgegate: target cpu, int8, 1 gate (ExitMLP (whole model): exit), ")
    fields = _labelled(text)
    steps, total = " ".join(fields["Steps (s)"]).rsplit("; total ", 1)
    timed = re.findall(r"([a-z_]+) (\d+\.\d\d)", steps)
    assert [name for name, _ in timed] == STEPS  # run order, import first
    assert sum(float(s) for _, s in timed) == pytest.approx(float(total), abs=0.15)
    m = json.loads((int8_export.cwd / "int8.edgegate" / "manifest.json").read_text())
    fid = m["quant"]["fidelity"]
    top1 = fid["intervals"]["top1_agreement"]
    assert fields["Fidelity"][0].startswith(f"top-1 agreement {fid['top1_agreement']:.4f} [{top1['low']:.4f}, "
                                            f"{top1['high']:.4f}], output SQNR {fid['output_sqnr_db']:.1f} dB")
    assert fields["Gate fidelity"] == [f"ExitMLP (whole model): exit agreement {fid['summary']['exit_agreement']:.4f}"
                                       + fields["Gate fidelity"][0].split(f"{fid['summary']['exit_agreement']:.4f}")[1]]
    # It ends with the fidelity target and what met it, then what was kept in higher precision, with reasons.
    search = m["quant"]["search"]
    assert fields["Target"][0].startswith(f"0.995 met by try {len(search['tries'])} of {len(search['tries'])} (")
    assert "A16 layers" not in fields and m["quant"]["a16"] is None  # float first: the cheaper promotion on cpu
    kept = set(", ".join(fields["Kept float"]).split(", "))
    promoted = {f"{p} (feeds a gate decision; kept float for gate fidelity)" for p in search["chosen"]["float_layers"]}
    assert kept == {"heads.0 (exit head 0)", "heads.1 (exit head 1)", "heads.2 (exit head 2)", *promoted}
    assert list(fields)[-2:] == ["Target", "Kept float"]  # and nothing after: no warning


def test_inspect_of_a_quantized_bundle_is_a_summary_with_the_raw_record_behind_json(int8_export) -> None:
    work = int8_export.cwd
    r = edgegate("inspect", "int8.edgegate", cwd=work)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "{'" not in text and "0.9966666" not in text and len(text.splitlines()) < 40  # no raw dict of floats
    fields = _labelled(text)
    m = json.loads((work / "int8.edgegate" / "manifest.json").read_text())
    q = m["quant"]
    # The observer is the one the fidelity search chose (percentile asked; all three are tried).
    assert fields["Quantization"] == [f"int8 (asymmetric form), gate-aware calibration on clusters ({q['samples']} "
                                      "samples: train 424 + val 600; held out 2976: test 600 + train 2376), observer "
                                      f"{q['config']['observer']}, gate layers kept float"]
    stages = " / ".join(str(n) for n in q["calibrated"]["stages"][""])
    assert fields["Coverage"][0] == f"rows per stage of ExitMLP (whole model): {stages}"
    assert fields["Coverage"][-1] == "augmented for calibration: no"
    assert {"heads.0 (exit head 0)", "heads.1 (exit head 1)", "heads.2 (exit head 2)"} <= set(
        ", ".join(fields["Kept float"]).split(", "))
    size = sum(f["bytes"] for f in m["files"].values()) / 1024
    assert fields["Files"][-1].endswith(f"; total {size:.1f} KiB")
    assert fields["ONNX ops"][1].startswith("edgegate::ExitDecision 2, ")  # edgegate's ops first
    # The gate table: a model-level gate (name "") shows its class.
    rows = text.splitlines()
    header = rows.index(next(x for x in rows if x.split()[:4] == ["gate", "kind", "module", "details"]))
    assert rows[header + 2].split()[:5] == ["ExitMLP", "(whole", "model)", "exit", "ExitMLP"]
    raw = json.loads(edgegate("inspect", "int8.edgegate", "--json", cwd=work).stdout)
    assert raw["quant"] == q and raw["gates"] == m["gates"]


def test_a_terminal_and_a_pipe_get_the_same_plain_text(int8_export) -> None:
    work = int8_export.cwd
    for args in (("inspect", "int8.edgegate"), ("targets",)):
        piped = edgegate(*args, cwd=work)
        code, out, err = on_terminal(*args, cwd=work)  # COLUMNS=80
        assert code == 0 and piped.returncode == 0, err
        assert screen_lines(out)[:-1] == piped.stdout.splitlines()  # the pty adds the final newline's line
        assert not BOX.search(out) and "\x1b" not in out
        assert any(len(line) > 80 for line in piped.stdout.splitlines())  # long lines stay whole: no wrapping
    trt_row = next(line for line in piped.stdout.splitlines() if line.startswith("trt "))
    assert trt_row.split()[1] in ("yes", "no") and len(trt_row) > 80
    # On a terminal, a long command shows its progress on stderr, then erases it.
    code, out, err = on_terminal("bench", "int8.edgegate", "--runs", "500", "--warmup", "10", cwd=work)
    assert code == 0 and "bench: " in err and " runs " in err
    assert [line for line in screen_lines(err) if line.strip()] == []
    assert screen_lines(out)[0] == "=== edgegate bench: int8.edgegate (target cpu) ==="


def test_bench_defaults_to_a_time_budget(int8_export) -> None:
    work = int8_export.cwd
    r = edgegate("bench", "int8.edgegate", "--json", "default.json", cwd=work)
    assert r.returncode == 0, r.stderr
    report = json.loads((work / "default.json").read_text())
    assert (report["format"], report["version"]) == ("edgegate.bench", 5)
    assert report["budget"] == {"min_runs": 200, "min_seconds": 1.0, "max_seconds": 10.0}
    assert report["requested_runs"] is None and report["runs"] >= 200 and report["timed_s"] >= 1.0
    assert report["warmup"] >= 2 and sum(report["exits"]["counts"]) == report["runs"]
    setup = _labelled(r.stdout)["Setup"][0]
    assert (f"runs {report['runs']} (time budget: >= 200 runs and >= 1 s, cap 10 s)" in setup
            and f"warm-up {report['warmup']} runs" in setup)
    # --runs and --max-seconds are kept: an exact count, or a cap.
    r = edgegate("bench", "int8.edgegate", "--runs", "50", "--warmup", "5", "--json", "fixed.json", cwd=work)
    fixed = json.loads((work / "fixed.json").read_text())
    assert (fixed["runs"], fixed["requested_runs"], fixed["warmup"], fixed["budget"]) == (50, 50, 5, None)
    r = edgegate("bench", "int8.edgegate", "--max-seconds", "0.2", "--json", "capped.json", cwd=work)
    capped = json.loads((work / "capped.json").read_text())
    assert capped["budget"]["max_seconds"] == 0.2 and capped["timed_s"] < 0.6


def test_snn_bench_lines_say_what_they_mean(early_exit_model, tmp_path) -> None:
    from edgegate.pipeline import ExportConfig, run_export

    shutil.copy(early_exit_model, tmp_path / "model.pt")
    run_export(tmp_path / "model.pt", tmp_path / "snn.edgegate", ExportConfig(target="snn",
                                                                             target_options={"timesteps": "16"}))
    r = edgegate("bench", "snn.edgegate", "--runs", "20", "--warmup", "2", "--json", "b.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    exits = next(i for i, line in enumerate(lines) if line.startswith("Exits        : "))
    assert lines[exits].endswith("; mean depth 3.00 [exit_index over 20 timed runs]")
    assert lines[exits + 1].startswith("             : (the SNN runs every stage and decides early in time instead")
    runtime = next(i for i, line in enumerate(lines) if line.startswith("Runtime      : "))
    assert lines[runtime] == "Runtime      : emulator counts of the last timed run (samples = its batch):"
    assert lines[runtime + 1].startswith("             : samples 1, timesteps 16, ")
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report["notes"]) == {"exits", "runtime_metrics"} and report["runtime_metrics"]["samples"] == 1


def _actions(parser: argparse.ArgumentParser, prefix: str = "edgegate"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prefix, action


def test_every_argument_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    missing = [f"{cmd} {a.dest}" for cmd, a in _actions(parser) if not (a.help or "").strip()]
    assert missing == []

    def help_of(*path: str) -> str:
        p = parser
        for name in path:
            p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        return " ".join(p.format_help().split())  # unwrap argparse's line breaks

    bench, compare = help_of("bench"), help_of("compare")
    assert "--runs RUNS exactly this many timed runs (default: a time budget, >= 200 runs" in bench
    assert "--warmup N untimed runs before timing (default: as many as fill 0.2 s)" in bench
    assert "--min-seconds S time budget: time runs for at least this long (ignored with --runs) (default: 1.0)" in bench
    assert "--warmup WARMUP untimed runs per model before the timed ones (default: 10)" in compare
    assert "path a bundle directory, a model file" in help_of("inspect")
    zoo_train = help_of("zoo", "train")
    assert "name zoo model name (see `edgegate zoo list`)" in zoo_train and "(default: 0)" in zoo_train
    assert "--target TARGET cpu, trt or snn (see `edgegate targets`) (default: cpu)" in help_of("export")


def test_zoo_alone_lists_its_commands_and_a_typo_gets_the_closest(capsys) -> None:
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: edgegate zoo") and "list the zoo models" in out and "train a zoo model" in out
    assert main([]) == 0 and "zoo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["zoo", "lst"])
    assert e.value.code == 2
    assert "invalid choice: 'lst'" in capsys.readouterr().err


def test_zoo_train_never_replaces_a_file_without_overwrite(tmp_path, capsys) -> None:
    (tmp_path / "model.pt").write_text("the user's own model")
    assert main(["zoo", "train", "early_exit", "-o", str(tmp_path / "model.pt")]) == 2
    assert capsys.readouterr().err == (f"edgegate: error: {tmp_path / 'model.pt'} already exists; pass --overwrite "
                                       "to replace that file or choose another -o\n")
    assert (tmp_path / "model.pt").read_text() == "the user's own model"

"""What the subcommands share: the parser and its help format, argument types, the trust flags, the live
status line, the extras a command may need, and interrupt checks.

Output rule for every command: results go to stdout as plain text (aligned columns, no box drawing, no
wrapping at the terminal width), the same on a terminal and in a pipe; a command with a report has
``--json``. The live status line goes to stderr and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Top-level modules of the optional extras (pyproject.toml) -> the extra that installs them, so a command
# that needs one on a runtime-only install says what to install instead of printing a traceback.
EXTRA_OF_MODULE = {
    "torch": "compile",
    "onnx": "compile",
    "onnxscript": "compile",
    "onnxoptimizer": "compile",
    "brevitas": "compile",
    "sklearn": "compile",
    "safetensors": "compile",
    "matplotlib": "report",
    "nir": "snn",
    "threadpoolctl": "snn",
    "tensorrt_rtx_bindings": "trt",
    "tensorrt_rtx_libs": "trt",
}


def missing_extra(e: ImportError) -> str | None:
    """The pip extra that provides the module `e` failed to import, or None when it is not one of ours."""
    name = getattr(e, "name", None)
    return EXTRA_OF_MODULE.get(name.split(".")[0]) if isinstance(name, str) else None


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default appended where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None or default is False or default == argparse.SUPPRESS
            or isinstance(default, list) and not default
            or not (action.option_strings or action.nargs in ("?", "*"))
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (subcommands inherit it), and a
    mistyped command or choice suggests the closest one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"edgegate: error: {message}{_suggestion(message)} (see `{self.prog} --help`)\n")


def _suggestion(message: str) -> str:
    # argparse's wording since 3.9: "argument X: invalid choice: 'val' (choose from 'a', 'b', ...)".
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not m:
        return ""
    choices = re.findall(r"'([^']*)'", m.group(2)) or [c.strip() for c in m.group(2).split(",")]
    close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def add_group(sub: argparse._SubParsersAction, name: str, commands: str, **kwargs: Any) -> argparse._SubParsersAction:
    """Command ``name`` made of subcommands (``commands``: their metavar, e.g. "{list,train}"); its parser gets
    ``kwargs`` (help, description). Alone (``edgegate zoo``) it prints its help, not "required: zoo_command"."""
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(func=lambda args: print_help(parser))
    return parser.add_subparsers(dest=f"{name}_command", metavar=commands)


def number(what: str, ok: Callable[[Any], bool], must: str, kind: type = float) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` (``what``: "a number", "an integer"...) for which ``ok`` holds; else the
    error "TEXT must ..." (``must``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} {must}")
        return value

    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= `minimum` (negative batch sizes and ranks are refused up front)."""
    return number("an integer", lambda v: v >= minimum, f"must be >= {minimum}", int)


fraction = number("a number", lambda v: 0 < v < 1, "must be a fraction between 0 and 1 (e.g. 0.2)")  # --holdout
positive_seconds = number("a number of seconds", lambda v: 0 < v < float("inf"),
                          "must be a finite number of seconds > 0")


def add_input_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE[:DTYPE]",
                    help="a model input, batch first, e.g. x:1x3x224x224 or input_ids:1x128:int64 (dtype default "
                    "float32); repeat it for each input in forward's order; replaces the inputs the model records")


def add_trust_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--trust-model", action="store_true",
                    help="allow model formats that run code when loaded (full pickles, TorchScript, .pt2)")
    sp.add_argument("--model", dest="model_class", metavar="CLASS_PATH",
                    help="module.path:Class that rebuilds a plain state_dict or a non-edgegate checkpoint")


class Status(contextlib.AbstractContextManager):
    """One live line on stderr while a command works (``export: calibrate (4/9) 3.2s``), erased at the end.

    Drawn only when stderr is a terminal, and never faster than `interval`: bench reports every run, and
    the status must not cost the timed loop anything. No thread: the line changes when the command
    reports progress, so nothing competes with the work for the interpreter.
    """

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.live = _isatty(self.stream)
        self.label, self.interval = label, interval
        self._start = time.perf_counter()
        self._last = -interval
        self._shown = False

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def update(self, text: str, force: bool = True) -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self.stream.write(f"\r\x1b[K{self.label}: {text} {now - self._start:.1f}s")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


INTERRUPTED = threading.Event()


def raise_interrupt(signum, frame) -> None:
    # Remembered as well as raised: a KeyboardInterrupt raised inside a library's import machinery or a
    # finalizer can be swallowed there, so long commands re-check the flag between steps.
    INTERRUPTED.set()
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if SIGINT/SIGTERM arrived, even if a library swallowed the first one."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt

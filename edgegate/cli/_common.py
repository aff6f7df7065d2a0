"""What the subcommands share: the console, argument types, the trust flags, interrupt checks."""

from __future__ import annotations

import argparse
import threading

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def console():
    from rich.console import Console

    return Console(highlight=False)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (subcommands inherit it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"edgegate: error: {message} (see `{self.prog} --help`)\n")


def int_at_least(minimum: int):
    """An argparse type: an int >= `minimum` (negative batch sizes and ranks are refused up front)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type: a float strictly between 0 and 1 (--holdout)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a fraction between 0 and 1 (e.g. 0.2)")
    return value


def add_input_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE[:DTYPE]",
                    help="a model input, batch first, e.g. x:1x3x224x224 or input_ids:1x128:int64 (dtype default "
                    "float32); repeat it for each input in forward's order; replaces the inputs the model records")


def add_trust_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--trust-model", action="store_true",
                    help="allow model formats that run code when loaded (full pickles, TorchScript, .pt2)")
    sp.add_argument("--model", dest="model_class", metavar="CLASS_PATH",
                    help="module.path:Class that rebuilds a plain state_dict or a non-edgegate checkpoint")


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

"""Command line: thin subcommands over the library (export, inspect, bench, compare, targets, zoo).

One module per subcommand; each has ``register(sub)`` adding its parser. Errors the user can fix
(``EdgegateError``) print as one line on stderr and exit with code 2; ``--debug`` shows the traceback.
An interrupted run exits 130 and leaves no partial bundle.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from edgegate.cli import bench, compare, export, inspect, sweep, targets, zoo
from edgegate.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    INTERRUPTED,
    Parser,
    check_interrupted,
    raise_interrupt,
)
from edgegate.errors import EdgegateError, os_error_text

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "build_parser", "check_interrupted", "main"]

COMMANDS = (export, inspect, bench, compare, targets, zoo, sweep)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="edgegate", description="Deploy conditional-computation networks to edge targets.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so temp directories are removed and no partial bundle is left.
    INTERRUPTED.clear()
    signal.signal(signal.SIGTERM, raise_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, raise_interrupt)
    try:
        return args.func(args)
    except EdgegateError as e:
        if args.debug:
            raise
        print(f"edgegate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("edgegate: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours
        sys.stderr.close()
        return 0
    except OSError as e:  # a file we were asked to read or write: missing, unwritable, disk full
        if args.debug:
            raise
        print(f"edgegate: error: {os_error_text(e)}; check the path, free space and permissions", file=sys.stderr)
        return EXIT_USAGE

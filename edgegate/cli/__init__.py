"""Command line: thin subcommands over the library (export, inspect, bench, compare, targets, zoo).

One module per subcommand; each has ``register(sub)`` adding its parser. Errors the user can fix
(``EdgegateError``) print as one line on stderr and exit with code 2; ``--debug`` shows the traceback.
A command that needs an extra which is not installed (torch on a runtime-only device) says which one
in the same single line. An interrupted run exits 130 and leaves no partial bundle. Output is plain
text for people and pipes alike; see ``_common``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from typing import NoReturn

from edgegate.cli import bench, compare, device, export, inspect, sweep, targets, zoo
from edgegate.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    INTERRUPTED,
    Parser,
    check_interrupted,
    missing_extra,
    print_help,
    raise_interrupt,
)
from edgegate.errors import EdgegateError, os_error_text

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "build_parser", "check_interrupted", "main"]

COMMANDS = (export, inspect, bench, compare, targets, zoo, device, sweep)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="edgegate", description="Deploy conditional-computation networks to edge targets.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    p.set_defaults(func=lambda args: print_help(p))  # `edgegate` alone: the commands, not an error
    return p


def run() -> NoReturn:
    """The ``edgegate`` command: ``main`` and exit with its code.

    An interrupted run (130) leaves the process without running the interpreter's shutdown: its cleanup
    already ran while the interrupt unwound, and a KeyboardInterrupt that passed through code a C extension
    ran (``PyRun_*``) leaves CPython's "unhandled interrupt" mark set, which at shutdown turns exit 130 into
    a death by SIGINT."""
    code = main()
    if code == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


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
    except ModuleNotFoundError as e:  # an optional extra this command needs (torch on a runtime-only device)
        extra = missing_extra(e)
        if extra is None or args.debug:
            raise
        command = " ".join(c for c in ("edgegate", args.command, getattr(args, "zoo_command", None)) if c)
        print(f"edgegate: error: `{command}` needs {e.name.split('.')[0]}, which is not installed here: "
              f"pip install 'edgegate[{extra}]'", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Cleanup is done: a signal arriving late (one a C extension held back) must not turn exit 130 into
        # a death by signal while the interpreter shuts down.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
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

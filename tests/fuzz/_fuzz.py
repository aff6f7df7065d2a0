"""Fuzzing conventions for edgegate's parsers (hypothesis).

Every fuzzer in ``tests/fuzz`` feeds arbitrary or mutated bytes to one parser and asserts the only
contract that matters for hostile input: the parser returns, or raises an ``EdgegateError`` whose
message is one line. Any other exception (``zipfile.BadZipFile``, ``UnicodeDecodeError``,
``struct.error``, ``RecursionError``, ``MemoryError``...) is a bug in the parser, fixed there.

How to write one:
- decorate the test with ``@FUZZ`` (and ``@given``); do not set ``max_examples`` yourself;
- start from real files (``seeds``) and mutate them with `mutated`: random bytes alone rarely get
  past the first magic-number check;
- call the parser through `expect_edgegate_error`, which enforces the contract.

Runs: by default (CI) each fuzzer runs ``CI_EXAMPLES`` derandomized examples, so CI is fast and
repeatable. A long run sets the count, explores new examples each time and keeps failures in
hypothesis' example database::

    EDGEGATE_FUZZ_EXAMPLES=100000 python -m pytest tests/fuzz --hypothesis-show-statistics
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from edgegate.errors import EdgegateError

CI_EXAMPLES = 150
EXAMPLES = int(os.environ.get("EDGEGATE_FUZZ_EXAMPLES", "0") or 0)
LONG = EXAMPLES > 0

FUZZ = settings(
    max_examples=EXAMPLES if LONG else CI_EXAMPLES,
    deadline=None,  # parsers of larger seeds take a few ms; timing is not what we test
    derandomize=not LONG,
    database=settings.default.database if LONG else None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
    print_blob=True,
)

T = TypeVar("T")


def expect_edgegate_error(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | EdgegateError:
    """Call ``fn``; return its result or the ``EdgegateError`` it raised (one-line message checked).

    Any other exception propagates, and hypothesis reports and shrinks it.
    """
    try:
        return fn(*args, **kwargs)
    except EdgegateError as e:
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, f"not a one-line message: {message!r}"
        return e


_OPS = ("flip", "set", "truncate", "insert", "delete", "overwrite", "duplicate")


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes], max_mutations: int = 4) -> bytes:
    """One of ``seeds`` with up to ``max_mutations`` byte-level edits (flip, truncate, insert, splice...)."""
    data = bytearray(draw(st.sampled_from(list(seeds))))
    for _ in range(draw(st.integers(0, max_mutations))):
        op = draw(st.sampled_from(_OPS))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        elif op == "duplicate":
            n = draw(st.integers(1, 64))
            data[pos:pos] = data[pos : pos + n]
    return bytes(data)


def framed(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Mutated seeds, plus random bytes behind each seed's first 16 bytes (past the magic-number check)."""
    prefixes = sorted({s[:n] for s in seeds for n in (2, 4, 8, 16)})
    return st.one_of(
        mutated(seeds),
        st.builds(lambda p, b: p + b, st.sampled_from(prefixes), st.binary(max_size=512)),
        st.binary(max_size=256),
    )

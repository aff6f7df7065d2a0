"""Errors raised by edgegate.

Library code raises one of these with a message that says what is wrong and what to do;
the CLI prints it as one line and exits with code 2.
"""

from __future__ import annotations


class EdgegateError(Exception):
    """Base class: a problem the user can fix (bad input, missing extra, unsupported model)."""


class UnsafeModelError(EdgegateError):
    """A model file would run code when loaded and ``--trust-model`` was not given."""


class ModelFormatError(EdgegateError):
    """A model or bundle file is corrupt, truncated or of an unknown format."""


class DataError(EdgegateError):
    """Calibration or evaluation data is empty, non-finite, or does not fit the model."""


class ExportError(EdgegateError):
    """A model cannot be exported to ONNX (unsupported module or op)."""


class TargetError(EdgegateError):
    """A target is unknown, unavailable, or cannot compile/run the model."""


class BundleError(EdgegateError):
    """A bundle directory is incomplete, tampered with, or cannot be written."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """`e` as one short line (whitespace collapsed, cut at `limit`), to quote a library's error in ours."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_error_text(e: OSError) -> str:
    """What went wrong with a file, in words: the OS message, then the file it names, if any."""
    return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")

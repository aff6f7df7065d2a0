"""Reading ``.npz`` files that others wrote (calibration data, evaluation data, golden files), safely.

Input: a path. Output: the arrays by name, or a :class:`DataError` saying what is wrong with the file.
numpy only (no torch, no onnx): bench reads bundles' golden files with it on a runtime-only device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgegate.errors import DataError, one_line

# Calibration and eval sets are small; a larger .npz is a mistake or a decompression bomb.
NPZ_MAX_BYTES = 4 << 30


def read_npz(path: str | Path, what: str = "data", hint: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file at ``path``, by name; any damaged or hostile file is a :class:`DataError`.

    Reads with numpy's own ``.npy`` reader but checks first what numpy would trust: the file is a zip
    of ``NAME.npy`` members, no name twice, plain numeric/bool dtypes (no pickled objects, no records),
    each array's declared size within what its member holds, and at most ``NPZ_MAX_BYTES`` in all,
    so a few bytes cannot make it allocate gigabytes. ``what`` and ``hint`` word the errors (what the
    file is; what to do), e.g. ``read_npz(path, "golden file", "re-export the bundle")``.
    """
    import zipfile

    path = Path(path)
    where = f"{what} {path}"
    hint = hint or "write it with numpy.savez(path, **{input_name: array})"
    try:
        with path.open("rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"cannot read {where}: {e.strerror or e}") from e
    if magic.startswith(b"\x93NUMPY"):
        raise DataError(f"{where} is a single .npy array, not an .npz keyed by input name; {hint}")
    if magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise DataError(f"{where} is not an .npz file (a zip of .npy arrays); {hint}")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if sum(i.file_size for i in infos) > NPZ_MAX_BYTES:
                raise DataError(f"{where} unpacks to more than {NPZ_MAX_BYTES >> 30} GiB; "
                                "use fewer samples for calibration")
            for info in infos:
                key = _npz_key(info.filename, where, hint)
                if key in arrays:
                    raise DataError(f"{where} holds array {_shown(key)} twice; {hint}")
                arrays[key] = _read_member(zf, info, key, where)
    except DataError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, CRC errors, numpy's ValueError on bad data
        raise DataError(f"{where} is a truncated or corrupt .npz ({one_line(e, 200)}); {hint}") from e
    return arrays


def _npz_key(member: str, where: str, hint: str) -> str:
    if not member.endswith(".npy") or len(member) <= 4:
        raise DataError(f"{where} has a member {_shown(member)} that is not an .npy array; {hint}")
    return member[:-4]


def _read_member(zf: Any, info: Any, key: str, where: str) -> np.ndarray:
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise DataError(f"{where}: array {_shown(key)} has .npy format version {version}; re-save it")
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise DataError(f"{where}: array {_shown(key)} has dtype {_shown(str(dtype))}; calibration data must be "
                        "plain numeric arrays (bool, int, float), not objects, records or strings")
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size:
        raise DataError(f"{where}: array {_shown(key)} declares shape {shape} ({declared} bytes) but holds only "
                        f"{info.file_size} bytes; the file is truncated or corrupt")
    with zf.open(info) as f:
        return fmt.read_array(f, allow_pickle=False)


def _shown(text: str, limit: int = 80) -> str:
    shown = repr(text)  # names come from the file: quoted and cut so the message stays one line
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"

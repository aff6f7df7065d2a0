"""Fuzz the .npz loader (calibration and eval data): `read_npz` and `load_data` on mutated and hostile files.

Whatever the file holds, loading gives arrays that fit the model (numeric, finite, right shape, at
least one sample) or raises an EdgegateError with a one-line message.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from _fuzz import FUZZ, expect_edgegate_error, framed
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgegate.data import Dataset, load_data, read_npz
from edgegate.errors import EdgegateError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


rng = np.random.default_rng(0)
SEEDS = [
    _npz(x=rng.standard_normal((6, 4)).astype(np.float32), labels=np.arange(6)),
    _npz(True, x=rng.standard_normal((3, 4)).astype(np.float32), t=np.arange(3, dtype=np.int64)),
    _npz(x=np.zeros((2, 4), np.float16)),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_npz")


def _load_and_check(path: Path) -> None:
    arrays = expect_edgegate_error(read_npz, path)
    if not isinstance(arrays, EdgegateError):
        assert all(a.dtype.kind in "biuf" for a in arrays.values())
    data = expect_edgegate_error(load_data, path, ["x"], {"x": [4]})
    if isinstance(data, Dataset):
        x = data.inputs["x"]
        assert x.ndim == 2 and x.shape[0] >= 1 and x.shape[1] == 4 and x.dtype.kind in "biuf"
        assert np.isfinite(x).all()
        assert data.labels is None or data.labels.shape == (x.shape[0],)


@FUZZ
@given(blob=framed(SEEDS))
def test_fuzz_npz_bytes(work: Path, blob: bytes) -> None:
    path = work / "fuzz.npz"
    path.write_bytes(blob)
    _load_and_check(path)


_dtypes = st.one_of(
    hnp.scalar_dtypes(),
    hnp.byte_string_dtypes(),
    hnp.unicode_string_dtypes(),
    st.just(np.dtype(object)),
    st.just(np.dtype([("a", "<f4"), ("b", "<i2")])),
    st.just(np.dtype(("<f4", (2,)))),
)


@st.composite
def _arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(_dtypes)
    shape = draw(st.sampled_from([(3, 4), (0, 4), (3, 5), (4,), (), (2, 4, 1), (1, 4)]))
    if dtype == np.dtype(object):
        return np.array([draw(st.integers())] * int(np.prod(shape)), dtype=object).reshape(shape)
    if dtype.subdtype is not None:  # hypothesis cannot fill sub-array dtypes
        return np.zeros(shape, dtype)
    return draw(hnp.arrays(dtype, shape))


@FUZZ
@given(
    arrays=st.dictionaries(st.sampled_from(["x", "labels", "y", "x/../y", ""]), _arrays(), max_size=3),
    compressed=st.booleans(),
)
def test_fuzz_npz_contents(work: Path, arrays: dict, compressed: bool) -> None:
    """Real .npz files (pickled object arrays included) of every dtype, shape and value numpy can write."""
    path = work / "contents.npz"
    try:
        path.write_bytes(_npz(compressed, **arrays))
    except (ValueError, TypeError):  # numpy cannot write this combination (e.g. a key of "")
        return
    _load_and_check(path)


# ------------------------------------------------------------------- hand-made hostile files, each refused


def _npy(header_shape: tuple, data: bytes, dtype: str = "<f4") -> bytes:
    header = {"descr": dtype, "fortran_order": False, "shape": header_shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    import warnings
    import zipfile

    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we write on purpose
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def _inflate_declared_sizes(data: bytes) -> bytes:
    """Patch every central-directory entry to claim ~4 GiB uncompressed (what a decompression bomb claims)."""
    out, i = bytearray(data), 0
    while (i := out.find(b"PK\x01\x02", i)) >= 0:
        out[i + 24 : i + 28] = (0xFFFFFF00).to_bytes(4, "little")
        i += 4
    return bytes(out)


@pytest.mark.parametrize(
    "blob, message",
    [
        (_npy((4,), b"\0" * 16), "is a single .npy array, not an .npz"),
        (b"\x80\x04K\x01.", "is not an .npz file"),
        (_zip([("x.npy", _npy((10**9,), b"\0" * 16))]), r"array 'x' declares shape \(1000000000,\)"),
        (_zip([("x.npy", _npy((2,), b"\0" * 8)), ("x.npy", _npy((2,), b"\0" * 8))]), "holds array 'x' twice"),
        (_zip([("x.txt", b"hello")]), "member 'x.txt' that is not an .npy array"),
        (_zip([("x.npy", _npy((2,), b"\0" * 8, "<U4"))]), "array 'x' has dtype '<U4'"),
        (_zip([("x.npy", _npy((2,), b"\0" * 8, "|O"))]), "array 'x' has dtype 'object'"),
        (_inflate_declared_sizes(_zip([("x.npy", _npy((2,), b"\0" * 8)), ("y.npy", _npy((2,), b"\0" * 8))])),
         "unpacks to more than 4 GiB"),
    ],
    ids=["npy", "pickle", "declared-too-big", "duplicate", "not-npy", "strings", "objects", "bomb"],
)
def test_hostile_npz_files_are_refused(work: Path, blob: bytes, message: str) -> None:
    (work / "hostile.npz").write_bytes(blob)
    with pytest.raises(EdgegateError, match=message):
        read_npz(work / "hostile.npz")

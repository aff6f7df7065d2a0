"""The calibration / held-out split of `data.split_data` and the row counts the manifest records.

A built-in calibrates on ``val`` plus a seeded pick of ``train`` rows (up to CALIBRATION_ROWS, keeping at least
HELD_OUT_MIN rows held out); the rest is held out, ``test`` first. A user's file: in full, or ``--holdout``.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgegate.data import CALIBRATION_ROWS, HELD_OUT_MIN, Dataset, load_data, row_counts, split_data


@pytest.mark.parametrize(("name", "counts"), [
    ("digits", ({"val": 270, "train": 627}, {"test": 270, "train": 630})),  # capped by HELD_OUT_MIN
    ("clusters", ({"val": 600, "train": 424}, {"test": 600, "train": 2376})),  # capped by CALIBRATION_ROWS
])
def test_built_ins_calibrate_on_val_plus_train_rows_and_hold_out_the_rest(name, counts):
    data = load_data(name)
    calib, held = split_data(data)
    assert (calib.splits.keys(), held.splits.keys()) == ({"val", "train"}, {"test", "train"})
    assert ({k: len(v) for k, v in calib.splits.items()}, {k: len(v) for k, v in held.splits.items()}) == counts
    assert len(calib) == min(CALIBRATION_ROWS, len(data) - HELD_OUT_MIN) and len(held) >= HELD_OUT_MIN
    assert row_counts(calib) == {"rows": len(calib), "splits": counts[0]}
    assert row_counts(held) == {"rows": len(held), "splits": counts[1]}
    x = data.input().reshape(len(data), -1)
    rows = {tuple(r) for r in x.tolist()}
    assert len(rows) == len(data)  # every row distinct: rows can be traced back by value
    index = {tuple(r): i for i, r in enumerate(x.tolist())}

    def origin(part):
        return np.array([index[tuple(r)] for r in part.input().reshape(len(part), -1).tolist()])

    c, h = origin(calib), origin(held)
    assert np.array_equal(c[calib.splits["val"]], data.splits["val"])  # val first, in order
    assert np.array_equal(h[held.splits["test"]], data.splits["test"])  # unseen rows first
    picked, rest = c[calib.splits["train"]], h[held.splits["train"]]
    assert np.isin(picked, data.splits["train"]).all() and np.isin(rest, data.splits["train"]).all()
    assert np.array_equal(np.sort(np.concatenate([c, h])), np.arange(len(data)))  # disjoint, nothing lost
    assert np.array_equal(held.labels, data.labels[h]) and np.array_equal(calib.labels, data.labels[c])
    again = split_data(load_data(name))[0]
    assert np.array_equal(again.input(), calib.input())  # the same pick on every run
    # accuracy is taken on held.split("test"): only rows the model never trained on
    assert np.array_equal(held.split("test").labels, data.labels[data.splits["test"]])


def test_markov_takes_no_train_rows_into_calibration():
    """Its windows overlap within a chain and its val split (9 920 windows) already exceeds CALIBRATION_ROWS."""
    data = load_data("markov", ["input_ids"], {"input_ids": (8,)})
    calib, held = split_data(data)
    assert row_counts(calib) == {"rows": 9920, "splits": {"val": 9920}}
    assert row_counts(held) == {"rows": len(data) - 9920, "splits": {"test": 9920, "train": 43648}}
    assert np.array_equal(calib.inputs["input_ids"], data.split("val").inputs["input_ids"])


def test_a_users_file_reports_rows_without_splits(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.arange(40, dtype=np.float32)[:, None])
    data = load_data(path, ["x"])
    calib, held = split_data(data)
    assert (row_counts(calib), row_counts(held)) == ({"rows": 40, "splits": {}}, None)
    calib, held = split_data(data, 0.25)
    assert (row_counts(calib), row_counts(held)) == ({"rows": 30, "splits": {}}, {"rows": 10, "splits": {}})


def test_a_small_built_in_calibrates_on_val_alone():
    """When the held-out part would drop under HELD_OUT_MIN, no train rows join the calibration."""
    n = 1000
    splits = {"train": np.arange(700), "val": np.arange(700, 850), "test": np.arange(850, n)}
    data = Dataset("small", {"x": np.arange(n, dtype=np.float32)[:, None]}, None, splits, {"kind": "builtin"})
    calib, held = split_data(data)
    assert row_counts(calib) == {"rows": 150, "splits": {"val": 150}}
    assert row_counts(held) == {"rows": 850, "splits": {"test": 150, "train": 700}}

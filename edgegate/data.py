"""Calibration and evaluation data: built-in datasets, npz files keyed by input name, validation.

Stage: data feeding calibrate / compare / bench. Input: a built-in dataset name (``digits``,
``clusters``, ``markov``) or an ``.npz`` file with one array per model input (optional ``labels``).
Output: a :class:`Dataset` (arrays keyed by model input name, labels, deterministic train/val/test
splits; `split_data` picks the calibration and held-out rows) and :class:`Inputs`, the batch
of model inputs every stage passes around (one array per input name, in the model's argument order).
Torch-free (numpy; scikit-learn only to build ``digits``/``clusters``) so the runtime side can use it.
Shapes in :class:`TensorSpec` and ``input_shapes`` are per sample (no batch dimension).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgegate.datasets import BUILTINS, builtin_names
from edgegate.errors import DataError
from edgegate.npz import read_npz

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
HOLDOUT_SEED = 0  # --holdout rows and a built-in's calibration pick of train rows: fixed, the same every run
# A built-in calibrates on val plus train rows up to CALIBRATION_ROWS (the fidelity search judges its tries on
# them), keeping at least HELD_OUT_MIN rows held out: enough for a Wilson interval that resolves 0.5 %.
CALIBRATION_ROWS, HELD_OUT_MIN = 1024, 900
LABELS_KEY = "labels"

@dataclass(frozen=True)
class TensorSpec:
    """A model input: name, per-sample shape (``None`` = any size), numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Inputs:
    """A batch of model inputs: arrays keyed by input name in the model's argument order, batch first.

    The arrays are numpy arrays or torch tensors (all of one kind). A single-input model is the common
    case: ``Inputs.of(x)`` wraps one array and ``first`` gives it back. Rows are cut with ``inputs[a:b]``
    or an index array, joined with `concat`, and the model runs with ``inputs.run(model)``, which calls
    ``model(*arrays)`` positionally, so a model's inputs are named by its spec, not by its parameter names.
    """

    arrays: Mapping[str, Any]

    def __post_init__(self) -> None:
        if not self.arrays:
            raise DataError("model inputs are empty: give at least one input array")

    @classmethod
    def of(cls, data: Any, names: Sequence[str] | None = None) -> Inputs:
        """`data` as Inputs: an Inputs, a mapping name -> array, a tuple/list of arrays (named by `names`,
        in order) or one array (named ``names[0]``, default ``input``)."""
        if isinstance(data, Inputs):
            return data
        if isinstance(data, Mapping):
            return cls(dict(data))
        if isinstance(data, (tuple, list)):
            got = list(names or [f"input_{i}" for i in range(len(data))])
            if len(got) != len(data):
                raise DataError(f"{len(data)} input arrays given for {len(got)} model inputs ({', '.join(got)}); "
                                "give one array per input")
            return cls(dict(zip(got, data, strict=True)))
        return cls({(names or ["input"])[0]: data})

    def __len__(self) -> int:
        return int(self.first.shape[0])

    def __getitem__(self, rows: Any) -> Inputs:
        return Inputs({k: v[rows] for k, v in self.arrays.items()})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    @property
    def args(self) -> tuple[Any, ...]:
        return tuple(self.arrays.values())

    @property
    def first(self) -> Any:
        return next(iter(self.arrays.values()))

    def map(self, fn: Callable[[Any], Any]) -> Inputs:
        return Inputs({k: fn(v) for k, v in self.arrays.items()})

    def run(self, model: Callable[..., Any]) -> Any:
        """``model(*arrays)``: the inputs go in positionally, in the model's argument order."""
        return model(*self.args)

    @staticmethod
    def concat(parts: Sequence[Inputs]) -> Inputs:
        """Rows of `parts` stacked, input by input (numpy arrays or torch tensors, as given)."""
        first = parts[0].first
        if isinstance(first, np.ndarray):
            return Inputs({k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].names})
        import torch  # only for tensors, which only the torch side has: data.py stays torch-free

        return Inputs({k: torch.cat([p.arrays[k] for p in parts]) for k in parts[0].names})


@dataclass(frozen=True)
class Dataset:
    """Samples keyed by model input name (each [N, ...]), labels [N] (or None) and split row indices."""

    name: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. n_classes, vocab_size

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @property
    def is_builtin(self) -> bool:
        """A built-in dataset (its val/test splits are calibration/held-out), not a user's file."""
        return self.info.get("kind") == "builtin"

    def model_inputs(self, names: Sequence[str] | None = None) -> Inputs:
        """Every row as :class:`Inputs`, in the order of `names` (the model's inputs; default: as stored)."""
        return Inputs({n: self.inputs[n] for n in (names or self.inputs)})

    def subset(self, rows: np.ndarray, name: str | None = None) -> Dataset:
        rows = np.asarray(rows, dtype=np.int64)
        return Dataset(name or self.name, {k: v[rows] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[rows], {}, dict(self.info))

    def split(self, which: str) -> Dataset:
        """The ``train`` / ``val`` / ``test`` part (or ``all``) as its own Dataset."""
        if which == "all":
            return self
        if which not in self.splits:
            raise DataError(f"dataset {self.name} has no split {which!r}; use one of {sorted(self.splits)}")
        return self.subset(self.splits[which], f"{self.name}:{which}")

    def input(self) -> np.ndarray:
        """The only input array (for single-input models)."""
        if len(self.inputs) != 1:
            raise DataError(f"dataset {self.name} has {len(self.inputs)} inputs "
                            f"({', '.join(self.inputs)}); pick one by name from .inputs")
        return next(iter(self.inputs.values()))

    def train_inputs(self) -> np.ndarray:
        return self.split("train").input()

    def val_inputs(self) -> np.ndarray:
        return self.split("val").input()

    def test_inputs(self) -> np.ndarray:
        return self.split("test").input()


def _random_splits(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(n * SPLIT_FRACTIONS[0]), int(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))
    return {"train": np.sort(perm[:a]), "val": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


def _chain_splits(n: int, chains: int) -> dict[str, np.ndarray]:
    # Markov windows overlap within a chain: split by whole chains so no window leaks across splits.
    per = n // chains
    a, b = int(chains * SPLIT_FRACTIONS[0]), int(chains * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))
    rows = np.arange(n)
    return {"train": rows[: a * per], "val": rows[a * per: b * per], "test": rows[b * per:]}


def _calibration_train_rows(dataset: Dataset, n_val: int, n_test: int, train: np.ndarray) -> np.ndarray:
    """The ``train`` rows a built-in calibrates on besides ``val`` (sorted; see `split_data`)."""
    if "chains" in dataset.info:  # windows overlap within a chain: a random pick would cut chains across the parts
        return train[:0]
    # More rows to judge the fidelity search on: 270 val rows alone let a try pass on a lucky sample.
    k = min(CALIBRATION_ROWS - n_val, n_test + len(train) - HELD_OUT_MIN, len(train))
    if k <= 0:
        return train[:0]
    return np.sort(np.random.default_rng(HOLDOUT_SEED).permutation(train)[:k])


def _with_splits(dataset: Dataset, parts: Mapping[str, np.ndarray], role: str) -> Dataset:
    """The rows of ``parts`` (split name -> row indices) in order, as one Dataset that keeps them as its splits."""
    kept = {k: v for k, v in parts.items() if len(v)}
    out = dataset.subset(np.concatenate(list(kept.values())), f"{dataset.name}:{role}")
    bounds = np.cumsum([0, *(len(v) for v in kept.values())])
    return dataclasses.replace(out, splits={k: np.arange(a, b) for k, a, b in zip(kept, bounds, bounds[1:],
                                                                                    strict=False)})


def row_counts(dataset: Dataset | None) -> dict[str, Any] | None:
    """``{rows, splits}`` of a calibration or held-out Dataset from `split_data` (None for none), for the manifest:
    which rows calibrated and which were held out. ``splits``: a built-in's rows by the split they came from
    (its ``train`` rows are rows the model trained on); empty for a user's file."""
    if dataset is None:
        return None
    splits = {k: len(v) for k, v in dataset.splits.items()} if dataset.is_builtin else {}
    return {"rows": len(dataset), "splits": splits}


def split_data(dataset: Dataset, holdout: float | None = None) -> tuple[Dataset, Dataset | None]:
    """(calibration rows, held-out rows or None) of `dataset`.

    A built-in dataset calibrates on its ``val`` split plus a seeded pick of ``train`` rows, up to
    `CALIBRATION_ROWS` rows in all while at least `HELD_OUT_MIN` rows stay held out (digits: 270 + 627
    rows calibrate, 900 are held out; clusters: 600 + 424, 2 976; markov's ``val`` alone has more rows, and
    its windows are split by whole chains, so it takes none from ``train``). Every other row is held out: the
    ``test`` split first, then the rest of ``train``. Both Datasets keep the splits their rows came from
    (`row_counts`), so accuracy can be taken on ``test`` alone (rows the model never trained on) and
    agreement on every held-out row. A user's file is used in full for calibration; with ``holdout``
    (0 < f < 1) a seeded random ``round(f * N)`` rows (at least one, leaving at least one) are set aside
    instead, the same rows on every run, to measure fidelity.
    """
    if dataset.is_builtin:
        if holdout is not None:
            raise DataError(f"--holdout applies to a --calib file; built-in dataset {dataset.name} already "
                            "holds out every row it does not calibrate on (leave out --holdout)")
        val, test, train = (dataset.splits[s] for s in ("val", "test", "train"))
        extra = _calibration_train_rows(dataset, len(val), len(test), train)
        rest = np.setdiff1d(train, extra)  # sorted, like the splits
        calib = _with_splits(dataset, {"val": val, "train": extra}, "calibration")
        return calib, _with_splits(dataset, {"test": test, "train": rest}, "held-out")
    if holdout is None:
        return dataset, None
    if not 0 < holdout < 1:
        raise DataError(f"--holdout {holdout} must be a fraction between 0 and 1 (e.g. 0.2)")
    n = len(dataset)
    if n < 2:
        raise DataError(f"data {dataset.name} has {n} row; --holdout needs at least 2 "
                        "(one to calibrate, one to hold out)")
    n_out = min(max(1, round(holdout * n)), n - 1)
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    return (dataset.subset(np.sort(perm[n_out:]), f"{dataset.name}:calibration"),
            dataset.subset(np.sort(perm[:n_out]), f"{dataset.name}:held-out"))


# ----------------------------------------------------------------------------------------------- load


def load_data(name_or_path: str | Path, input_names: Sequence[str] | None = None,
              input_shapes: Mapping[str, Sequence[int]] | None = None) -> Dataset:
    """A built-in dataset by name, or an ``.npz`` keyed by input name (plus optional ``labels``).

    ``input_names``: the model's input names (built-ins have one input, named ``input`` by default).
    ``input_shapes``: per-sample shapes; built-in samples are reshaped to them (e.g. digits as
    [1, 8, 8]), npz arrays must already have them.
    """
    key = str(name_or_path)
    if key in BUILTINS and not Path(key).is_file():
        return _load_builtin(key, input_names, input_shapes)
    return _load_npz(Path(key), input_names, input_shapes)


load_dataset = load_data  # the name the pipeline uses


def _load_builtin(name: str, input_names: Sequence[str] | None,
                  input_shapes: Mapping[str, Sequence[int]] | None) -> Dataset:
    names = list(input_names or ["input"])
    if len(names) != 1:
        raise DataError(f"built-in dataset {name} has one input, the model names {len(names)} "
                        f"({', '.join(names)}); provide an .npz keyed by input name instead")
    x, y, info = BUILTINS[name]()
    x, y = x.copy(), y.copy()  # the generators are cached; callers own their arrays
    shape = (input_shapes or {}).get(names[0])
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if int(np.prod(shape)) != int(np.prod(x.shape[1:])):
            raise DataError(f"built-in dataset {name} has samples of shape {list(x.shape[1:])}, which cannot "
                            f"be reshaped to the model input {names[0]!r} of shape {list(shape)}")
        x = x.reshape(len(x), *shape)
    splits = _chain_splits(len(x), info["chains"]) if name == "markov" else _random_splits(len(x))
    return Dataset(name, {names[0]: x}, y, splits, {**info, "kind": "builtin"})


def _load_npz(path: Path, input_names: Sequence[str] | None,
              input_shapes: Mapping[str, Sequence[int]] | None) -> Dataset:
    if not path.is_file():
        raise DataError(f"data {path} is neither a built-in dataset ({', '.join(builtin_names())}) "
                        "nor an existing .npz file")
    arrays = read_npz(path)
    labels = arrays.pop(LABELS_KEY, None)
    names = list(input_names) if input_names is not None else sorted(arrays)
    if not names:
        raise DataError(f"data {path} holds no input arrays; write it with numpy.savez(path, **{{input_name: array}})")
    # The file's own dtypes are taken as given; shapes are checked when the caller knows them.
    specs = [_spec_of(n, arrays.get(n), (input_shapes or {}).get(n)) for n in names]
    validate_inputs(arrays, specs, source=str(path))
    n = len(arrays[names[0]])
    if labels is not None:
        if labels.ndim != 1 or len(labels) != n:
            raise DataError(f"data {path}: 'labels' has shape {labels.shape}; it needs one label per sample ({n},)")
        if labels.dtype.kind not in "biu":
            raise DataError(f"data {path}: 'labels' has dtype {labels.dtype}; class labels are integers")
    return Dataset(path.stem, {k: arrays[k] for k in names}, labels, _random_splits(n), {"kind": "npz"})


def _spec_of(name: str, array: np.ndarray | None, shape: Sequence[int] | None) -> TensorSpec:
    if array is None:  # missing: validate_inputs reports it before looking at shape or dtype
        return TensorSpec(name, (), "float32")
    return TensorSpec(name, tuple(array.shape[1:] if shape is None else shape), str(array.dtype))


# -------------------------------------------------------------------------------------- token-level LMs

TOKEN_INPUT, MASK_INPUT, UNSCORED = "input_ids", "attention_mask", -1
NEXT_TOKEN_TASK = ("next-token prediction at every position: position t's target is input_ids[t+1], the last "
                   "position's is the row's label when the data has labels; masked-out positions are not scored")


def next_token_labels(inputs: Mapping[str, Any], labels: np.ndarray | None,
                      logits_shape: Sequence[int]) -> np.ndarray | None:
    """Targets [N, T] (`UNSCORED` where none) of a causal LM's logits [N, T, V] (see `NEXT_TOKEN_TASK`), or
    None when the logits are not per token of an integer ``input_ids`` [N, T]."""
    ids = inputs.get(TOKEN_INPUT)
    if ids is None or len(logits_shape) != 3:
        return None
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu" or tuple(ids.shape) != tuple(logits_shape[:2]):
        return None
    targets = np.full(ids.shape, UNSCORED, np.int64)
    targets[:, :-1] = ids[:, 1:]
    if labels is not None and np.asarray(labels).shape == ids.shape[:1]:
        targets[:, -1] = np.asarray(labels)
    mask = inputs.get(MASK_INPUT)
    if mask is not None and np.asarray(mask).shape == ids.shape:
        live = np.asarray(mask) != 0
        targets[~live] = UNSCORED
        targets[:, :-1][~live[:, 1:]] = UNSCORED  # a target that is padding is no next token
    return targets


# -------------------------------------------------------------------------------------------- validate


def validate_inputs(arrays: Mapping[str, Any], specs: Sequence[TensorSpec] | Mapping[str, TensorSpec],
                    source: str = "inputs") -> None:
    """Raise :class:`DataError` (one line naming the tensor) unless ``arrays`` fit the model's ``specs``.

    Checks: missing / unexpected names, empty arrays, dtype, shape (per-sample, batch first),
    NaN/Inf values, and that every input has the same number of samples.
    """
    spec_list = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
    expected = [s.name for s in spec_list]
    missing = [n for n in expected if n not in arrays]
    if missing:
        got = ", ".join(map(repr, arrays)) or "none"
        raise DataError(f"{source}: missing input {missing[0]!r} (got {got}); "
                        f"provide one array per model input: {', '.join(expected)}")
    extra = [n for n in arrays if n not in expected]
    if extra:
        raise DataError(f"{source}: unexpected input {extra[0]!r}; the model takes {', '.join(expected)}")
    counts = {}
    for spec in spec_list:
        a = np.asarray(arrays[spec.name])
        want_shape = "(N, " + ", ".join("?" if d is None else str(d) for d in spec.shape) + ")"
        if a.dtype.kind not in "biuf" or a.dtype.names is not None:
            raise DataError(f"{source}: input {spec.name!r} has dtype {a.dtype}; model inputs are bool, int or "
                            "float arrays")
        if a.ndim == 0 or a.size == 0:
            raise DataError(f"{source}: input {spec.name!r} is empty (shape {a.shape}); "
                            "provide at least one sample")
        if a.dtype != np.dtype(spec.dtype):
            raise DataError(f"{source}: input {spec.name!r} has dtype {a.dtype}, the model expects "
                            f"{spec.dtype}; cast it (array.astype('{spec.dtype}'))")
        fits = a.ndim == len(spec.shape) + 1 and all(
            d is None or int(d) == s for d, s in zip(spec.shape, a.shape[1:], strict=True))
        if not fits:
            raise DataError(f"{source}: input {spec.name!r} has shape {tuple(a.shape)}, the model expects "
                            f"{want_shape} with the batch first")
        if a.dtype.kind in "fc":
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                raise DataError(f"{source}: input {spec.name!r} has {bad} NaN/Inf values; "
                                "clean or drop those samples")
        counts[spec.name] = a.shape[0]
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise DataError(f"{source}: inputs have different sample counts ({shown}); "
                        "give every input the same N")

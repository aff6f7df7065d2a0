"""Sweep spec: a TOML file -> a validated `SweepSpec` -> the list of `Cell`s to run.

Input: the spec file (format in README, "Sweeps"), read with the standard library's ``tomllib``.
Every key is checked before anything runs; a bad key raises `SweepError` naming the file and the key.
Output: `SweepSpec` (frozen; paths resolved against the spec's folder) and, by `expand`, one `Cell`
per combination of models x targets x quant x observer x calibration x lowrank x per-target options,
with the axes a scheme ignores collapsed (observer/calibration exist for int8 only, lowrank for
ternary only), so no two cells do the same work. ``[device]`` sends every cell's bench to a device
agent (``edgegate device serve``). `SweepSpec.to_dict` / `from_dict` round-trip the spec through
``sweep.json`` (the token file's path, never the token) so ``--resume`` needs no spec file.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgegate import targets as targets_registry
from edgegate.datasets import BUILTINS
from edgegate.device import DeviceClient, DeviceError, read_token
from edgegate.errors import EdgegateError, one_line, os_error_text
from edgegate.quantization.config import CalibrationMode, Observer
from edgegate.schemes import QuantScheme

QUANTS = tuple(QuantScheme)
AXES = ("models", "targets", "quant", "observer", "calibration", "lowrank")
KEYS = (*AXES, "options", "data", "calib", "device", "bench", "compare", "ray")


class CellStatus(StrEnum):
    OK = "ok"
    ERROR = "error"  # the row's `error` says why, in one line
    PENDING = "pending"  # not run yet (an interrupted or running sweep)


class SweepStatus(StrEnum):
    RUNNING = "running"
    COMPLETE = "complete"
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM
    STOPPED = "stopped"  # an error stopped the driver


class SweepError(EdgegateError):
    """A sweep spec or output directory is wrong, or the sweep cannot run (no Ray, a cluster not reached)."""


@dataclass(frozen=True)
class BenchSettings:
    """``[bench]``: how each cell's bundle is timed (``edgegate bench`` flags)."""

    runs: int = 50
    warmup: int = 5
    threads: int | None = 1  # one intra-op thread: cells share a node's cores; None: as the bundle records


@dataclass(frozen=True)
class CompareSettings:
    """``[compare]``: how much evaluation data each cell's compare uses (None: all of the test split)."""

    max_samples: int | None = None


@dataclass(frozen=True)
class RaySettings:
    """``[ray]``: what each cell task declares to Ray and how often a cell whose worker died is retried."""

    cpus_per_cell: float = 1.0
    memory_mib_per_cell: int = 2048
    max_retries: int = 2


@dataclass(frozen=True)
class DeviceSettings:
    """``[device]``: the agent that benches every cell (compare still runs on the node that made the bundle)."""

    url: str
    token_file: str  # absolute path; the token itself is read by the driver and never written to sweep.json

    def client(self) -> DeviceClient:
        return DeviceClient(self.url, read_token(self.token_file))


@dataclass(frozen=True)
class Cell:
    """One export + compare + bench. ``options`` are the target's ``-O KEY=VALUE`` strings."""

    model: Path
    target: str
    quant: str
    observer: str | None = None  # int8 only
    calibration: str | None = None  # int8 only
    lowrank: int = 0  # ternary only
    options: tuple[tuple[str, str], ...] = ()
    data: str | None = None  # built-in name or absolute .npz path; None: the model's own dataset
    calib: str | None = None
    device: str | None = None  # the URL of the agent that benches it; None: the node that made it

    def config(self) -> dict[str, Any]:
        """The normalised cell config (JSON-able; the model as its file name)."""
        return {"model": self.model.name, "target": self.target, "quant": self.quant, "observer": self.observer,
                "calibration": self.calibration, "lowrank": self.lowrank, "options": dict(self.options),
                "data": _shown(self.data), "calib": _shown(self.calib), "device": self.device}

    @property
    def name(self) -> str:
        """A short human name: model/target/quant[/observer/calibration][/rN][/k=v...]."""
        parts = [self.model.stem, self.target, self.quant]
        parts += [p for p in (self.observer, self.calibration) if p]
        parts += [f"r{self.lowrank}"] if self.lowrank else []
        parts += [f"{k}={v}" for k, v in self.options]
        return "/".join(parts)


@dataclass(frozen=True)
class SweepSpec:
    models: tuple[Path, ...]
    targets: tuple[str, ...] = ("cpu",)
    quant: tuple[str, ...] = ("fp32",)
    observer: tuple[str, ...] = (str(Observer.PERCENTILE),)
    calibration: tuple[str, ...] = (str(CalibrationMode.GATE_AWARE),)
    lowrank: tuple[int, ...] = (0,)
    options: Mapping[str, tuple[tuple[tuple[str, str], ...], ...]] = field(default_factory=dict)
    data: str | None = None
    calib: str | None = None
    bench: BenchSettings = BenchSettings()
    compare: CompareSettings = CompareSettings()
    ray: RaySettings = RaySettings()
    device: DeviceSettings | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form with absolute paths (stored in sweep.json; `from_dict` reads it back)."""
        return {"models": [str(m) for m in self.models], "targets": list(self.targets), "quant": list(self.quant),
                "observer": list(self.observer), "calibration": list(self.calibration),
                "lowrank": list(self.lowrank),
                "options": {t: [dict(v) for v in variants] for t, variants in self.options.items()},
                "data": self.data, "calib": self.calib,
                "bench": _fields(self.bench), "compare": _fields(self.compare), "ray": _fields(self.ray),
                "device": None if self.device is None else _fields(self.device)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> SweepSpec:
        try:
            return cls(models=tuple(Path(m) for m in d["models"]), targets=tuple(d["targets"]),
                       quant=tuple(d["quant"]), observer=tuple(d["observer"]),
                       calibration=tuple(d["calibration"]), lowrank=tuple(int(r) for r in d["lowrank"]),
                       options={t: tuple(tuple(sorted(v.items())) for v in variants)
                                for t, variants in d["options"].items()},
                       data=d["data"], calib=d["calib"], bench=BenchSettings(**d["bench"]),
                       compare=CompareSettings(**d["compare"]), ray=RaySettings(**d["ray"]),
                       device=None if d.get("device") is None else DeviceSettings(**d["device"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SweepError(f"{where}: the recorded spec is damaged ({one_line(e, 120)}); "
                             "run the sweep again with its SPEC.toml") from e


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _shown(source: str | None) -> str | None:
    # A data file is named by its file name in the config; its content is in the cell key (`key.py`).
    return None if source is None or source in BUILTINS else Path(source).name


# ------------------------------------------------------------------------------------------------ read


def read_parsed(path: Path, parse: Callable[[str], Any], name: str, invalid: Callable[[ValueError], str]) -> Any:
    """``parse`` of the UTF-8 text of the file ``path``; a SweepError "cannot read NAME: why" when it cannot be
    read, ``invalid(e)`` when it is not UTF-8 or ``parse`` refuses it (TOML and JSON errors are ValueErrors)."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SweepError(f"cannot read {name}: {os_error_text(e)}") from e
    except ValueError as e:
        raise SweepError(invalid(e)) from e


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate the spec at `path`; relative file names are resolved against its folder."""
    path = Path(path)

    def invalid(e: ValueError) -> str:
        if isinstance(e, UnicodeDecodeError):
            return f"sweep spec {path} is not UTF-8 text; save it as UTF-8"
        return f"sweep spec {path} is not valid TOML: {one_line(e, 160)}"

    raw = read_parsed(path, tomllib.loads, f"sweep spec {path}", invalid)
    return parse_spec(raw, path.parent.absolute(), str(path))


def parse_spec(raw: Mapping[str, Any], base: Path, where: str) -> SweepSpec:
    """Validate the TOML table `raw` of the spec `where` (paths relative to `base`)."""
    _known(raw, KEYS, where, "")
    if "models" not in raw:
        raise SweepError(f"{where}: key 'models' is missing; list the model files to sweep, e.g. "
                         "models = [\"model.pt\"]")
    models = tuple(_model(m, base, where) for m in _strings(raw["models"], "models", where))
    targets = _strings(raw.get("targets", ["cpu"]), "targets", where)
    for t in targets:
        try:
            targets_registry.get(t)
        except EdgegateError as e:
            raise SweepError(f"{where}: key 'targets': {e}") from e
    quant = _choices(raw.get("quant", ["fp32"]), "quant", QUANTS, where)
    observer = _choices(raw.get("observer", [str(Observer.PERCENTILE)]), "observer", tuple(Observer), where)
    calibration = _choices(raw.get("calibration", [str(CalibrationMode.GATE_AWARE)]), "calibration",
                           tuple(CalibrationMode), where)
    lowrank = _ints(raw.get("lowrank", [0]), "lowrank", where)
    for key, scheme in (("observer", "int8"), ("calibration", "int8"), ("lowrank", "ternary")):
        if key in raw and scheme not in quant:
            raise SweepError(f"{where}: key '{key}' applies to quant {scheme} only, and quant has no {scheme}; "
                             f"add \"{scheme}\" to quant or remove '{key}'")
    options = _options(raw.get("options", {}), targets, where)
    return SweepSpec(models=models, targets=targets, quant=quant, observer=observer, calibration=calibration,
                     lowrank=lowrank, options=options, data=_source(raw.get("data"), "data", base, where),
                     calib=_source(raw.get("calib"), "calib", base, where),
                     bench=_settings(raw.get("bench", {}), BenchSettings, "bench", where),
                     compare=_settings(raw.get("compare", {}), CompareSettings, "compare", where),
                     ray=_settings(raw.get("ray", {}), RaySettings, "ray", where),
                     device=_device(raw.get("device"), base, where))


def _known(table: Mapping[str, Any], known: Sequence[str], where: str, prefix: str) -> None:
    for key in table:
        if key not in known:
            raise SweepError(f"{where}: unknown key '{prefix}{key}' (known: {', '.join(known)})")


def _listed(value: Any, key: str, where: str) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise SweepError(f"{where}: key '{key}' is an empty list; give at least one value or remove the key")
    return items


def _values(value: Any, key: str, where: str, ok: Callable[[Any], bool], what: str) -> tuple[Any, ...]:
    items = _listed(value, key, where)
    for v in items:
        if not ok(v):
            raise SweepError(f"{where}: key '{key}' must be {what}, not {v!r}")
    return tuple(dict.fromkeys(items))  # a value listed twice is one cell, not two


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    return _values(value, key, where, lambda v: isinstance(v, str) and bool(v.strip()), "a string or a list of strings")


def _choices(value: Any, key: str, allowed: Sequence[str], where: str) -> tuple[str, ...]:
    items = _strings(value, key, where)
    for v in items:
        if v not in allowed:
            raise SweepError(f"{where}: key '{key}' has {v!r}; use one of {', '.join(map(str, allowed))}")
    return items


def _ints(value: Any, key: str, where: str) -> tuple[int, ...]:
    return _values(value, key, where, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                   "an int >= 0 or a list of them")


def _model(name: str, base: Path, where: str) -> Path:
    path = (base / name).absolute()
    if not path.is_file():
        what = "is a folder (sweeps take model files)" if path.is_dir() else "does not exist"
        raise SweepError(f"{where}: models entry {name!r} {what}: {path}")
    return path


def _source(value: Any, key: str, base: Path, where: str) -> str | None:
    """A built-in dataset name stays a name; anything else is an .npz file beside the spec."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SweepError(f"{where}: key '{key}' must be a built-in dataset ({', '.join(sorted(BUILTINS))}) "
                         f"or an .npz file, not {value!r}")
    path = (base / value).absolute()
    if value in BUILTINS and not path.is_file():
        return value
    if not path.is_file():
        raise SweepError(f"{where}: key '{key}' = {value!r} is neither a built-in dataset "
                         f"({', '.join(sorted(BUILTINS))}) nor a file: {path}")
    return str(path)


def _options(value: Any, targets: Sequence[str], where: str) -> dict[str, tuple[tuple[tuple[str, str], ...], ...]]:
    """``[options] TARGET = {KEY = VALUE or [VALUES]}`` -> per target, every combination of values."""
    if not isinstance(value, dict):
        raise SweepError(f"{where}: key 'options' must be a table of target = {{KEY = VALUE}}")
    out = {}
    for target, table in value.items():
        if target not in targets:
            raise SweepError(f"{where}: key 'options.{target}' names a target that is not in targets "
                             f"({', '.join(targets)}); add it or remove the options")
        if not isinstance(table, dict) or not table:
            raise SweepError(f"{where}: key 'options.{target}' must be a non-empty table of KEY = VALUE")
        keys, values = [], []
        for key, v in table.items():
            vs = _listed(v, f"options.{target}.{key}", where)
            for one in vs:
                if not isinstance(one, (str, int, float, bool)):
                    raise SweepError(f"{where}: key 'options.{target}.{key}' must be a string, number or "
                                     f"boolean (or a list of them), not {one!r}")
            keys.append(key)
            values.append(list(dict.fromkeys(_option_text(one) for one in vs)))
        out[target] = tuple(tuple(sorted(zip(keys, combo, strict=True))) for combo in itertools.product(*values))
    return out


def _device(value: Any, base: Path, where: str) -> DeviceSettings | None:
    """``[device] url = "http://HOST:PORT", token_file = "agent.token"`` (the file beside the spec)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SweepError(f"{where}: key 'device' must be a table: [device] url = \"http://HOST:PORT\", "
                         "token_file = \"agent.token\"")
    _known(value, ("url", "token_file"), where, "device.")
    for key in ("url", "token_file"):
        if not isinstance(value.get(key), str) or not value[key].strip():
            raise SweepError(f"{where}: key 'device.{key}' is missing or not a string")
    token_file = str((base / value["token_file"]).absolute())
    try:  # the URL's form, then the token file (owner-only, one token): now, not in every cell
        url = DeviceClient(value["url"], token="").url  # as the client spells it
        read_token(token_file)
    except DeviceError as e:
        raise SweepError(f"{where}: key 'device': {e}") from e
    return DeviceSettings(url=url, token_file=token_file)


def _option_text(v: str | int | float | bool) -> str:
    # What `-O KEY=VALUE` would pass: targets parse strings ("true"/"false" for booleans).
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


# [bench]/[compare]/[ray] keys: (kind, lowest value); cpus_per_cell may be fractional (several cells per core).
_LIMITS: dict[str, tuple[type, float]] = {
    "runs": (int, 1), "warmup": (int, 0), "threads": (int, 0), "max_samples": (int, 1),
    "cpus_per_cell": (float, 0.01), "memory_mib_per_cell": (int, 1), "max_retries": (int, 0),
}


def _settings(value: Any, kind: type, key: str, where: str) -> Any:
    if not isinstance(value, dict):
        raise SweepError(f"{where}: key '{key}' must be a table")
    _known(value, [f.name for f in fields(kind)], where, f"{key}.")
    for name, v in value.items():
        number, low = _LIMITS[name]
        allowed = (int, float) if number is float else (int,)
        if not isinstance(v, allowed) or isinstance(v, bool) or v < low:
            what = "a number" if number is float else "a whole number"
            raise SweepError(f"{where}: key '{key}.{name}' = {v!r} is not valid; give {what} >= {low:g}")
    return kind(**value)


# ---------------------------------------------------------------------------------------------- expand


def expand(spec: SweepSpec) -> list[Cell]:
    """Every distinct cell of `spec`, in spec order (models outermost)."""
    cells: dict[Cell, None] = {}
    for model, target, quant in itertools.product(spec.models, spec.targets, spec.quant):
        observers: Sequence[str | None] = spec.observer if quant == QuantScheme.INT8 else (None,)
        calibrations: Sequence[str | None] = spec.calibration if quant == QuantScheme.INT8 else (None,)
        ranks: Sequence[int] = spec.lowrank if quant == QuantScheme.TERNARY else (0,)
        variants = spec.options.get(target, ((),))
        # Calibration data reaches quantized exports and targets that balance on data themselves (snn).
        uses_calib = QuantScheme(quant).calibrated or targets_registry.get(target).needs_calibration
        calib = spec.calib if uses_calib else None
        for observer, calibration, rank, options in itertools.product(observers, calibrations, ranks, variants):
            cells[Cell(model, target, quant, observer, calibration, rank, options, spec.data, calib,
                       None if spec.device is None else spec.device.url)] = None
    return list(cells)

"""Where activations are quantized: one float forward traced, one quantizer per tensor decided.

Stage: quantize (DESIGN §5), before calibration. Input: the float model, example inputs (the
calibration rows, under the deployed gating) and the paths of the Conv/Linear layers that will be
quantized. Output: a :class:`Layout` saying which tensors get a quantizer ("anchors"), where each sits
(after the op, or after the ReLU that alone reads the op's output), which functional ops run quantized,
and which quant layers read an anchored tensor (and share its quantizer as their input quantizer).

The rule, per tensor in execution order (the ``asymmetric`` form; ONNX Runtime x86 runs these integer ops):

* a quantized Conv's output is quantized (QLinearConv has a uint8 output);
* a compute op (``x + y``, ``x * y``, ``torch.cat``, average pooling, hardswish, hardsigmoid) is
  quantized when every activation it reads is, and then so is its output: a residual Add between two
  quantized convs becomes QLinearAdd, while a transformer's residual Add of float Linear outputs stays
  float (quantizing it would only add conversions);
* a transparent op (ReLU, max pooling, flatten/view, dropout) passes its input's quantizer on;
* a quantized tensor whose only reader is a ReLU is quantized after the ReLU instead (zero point 0:
  ONNX Runtime folds ``Relu -> QuantizeLinear`` into the op in front, as ``quantize_static`` graphs get).

Tracing uses a torch function mode and global module hooks (``sites.ScopeTracker``) during the model's
own eager forward, so gating and data-dependent control flow are followed as they run; an op the
forward never reaches stays float. Tensors are followed by identity (weak references: nothing is kept
alive), in-place ops included.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from edgegate.data import Inputs
from edgegate.quantization.sites import BINARY, COMPUTE, FUNCTIONS, OpKind, ScopeTracker, Site

log = logging.getLogger(__name__)

_METADATA = {"dim", "size", "shape", "dtype", "device", "numel", "is_floating_point", "ndim", "__len__",
             "is_contiguous", "requires_grad", "layout", "stride", "storage_offset", "__get__", "__format__",
             "__repr__", "is_complex"}


@dataclass(frozen=True)
class Anchor:
    """One activation quantizer: the tensor produced by ``producer`` (a layer path or a site key),
    quantized right after it, or after the ReLU site ``relu`` that is its only reader."""

    producer: str
    from_layer: bool
    relu: str | None = None


@dataclass(frozen=True)
class Layout:
    anchors: dict[str, Anchor] = field(default_factory=dict)  # anchor id -> anchor
    sites: dict[str, tuple[Site, str]] = field(default_factory=dict)  # quantized site key -> (site, anchor id)
    layer_inputs: dict[str, str] = field(default_factory=dict)  # quant layer path -> anchor id of its input
    group_sizes: dict[tuple[str, OpKind], int] = field(default_factory=dict)  # calls per (scope, kind)

    @property
    def empty(self) -> bool:
        return not self.anchors


@dataclass
class _Value:
    producer: str  # "layer:<path>", "site:<key>" or "other"
    anchor: str | None = None  # anchor id when quantized
    readers: list[str] = field(default_factory=list)  # "site:<key>", "layer:<path>", "other", "output"


class _Tracer(TorchFunctionMode):
    """Records, per watched call, the values it reads and the value it produces."""

    def __init__(self, model: nn.Module, tracker: ScopeTracker, convs: set[str]) -> None:
        super().__init__()
        self.tracker = tracker
        self.convs = convs
        self.constants = {id(t) for t in [*model.parameters(), *model.buffers()]}
        self.values: list[_Value] = []
        self.tags: dict[int, tuple[weakref.ref, int]] = {}
        self.sites: dict[str, tuple[Site, list[int], int]] = {}  # key -> (site, input vids, output vid)
        self.layer_inputs: dict[str, set[int]] = {}
        self.anchors: dict[str, Anchor] = {}

    # ------------------------------------------------------------------------------------------ values
    def value_of(self, t: torch.Tensor) -> int:
        hit = self.tags.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        return self.new_value(t, "other")

    def new_value(self, t: torch.Tensor, producer: str, anchor: str | None = None) -> int:
        self.values.append(_Value(producer, anchor))
        vid = len(self.values) - 1
        self.tags[id(t)] = (weakref.ref(t), vid)
        return vid

    def activations(self, args, kwargs) -> list[torch.Tensor]:
        return [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.is_floating_point()
                and id(a) not in self.constants]

    # ----------------------------------------------------------------------------------- module hooks
    def on_enter(self, path: str, module: nn.Module, args: tuple) -> None:
        if self.tracker.skip(module) and args and isinstance(args[0], torch.Tensor):
            vid = self.value_of(args[0])
            self.values[vid].readers.append(f"layer:{path}")
            self.layer_inputs.setdefault(path, set()).add(vid)

    def on_exit(self, path: str, module: nn.Module, args: tuple, out) -> None:
        if self.tracker.skip(module) and isinstance(out, torch.Tensor):
            anchor = f"layer:{path}" if path in self.convs else None
            if anchor:
                self.anchors[anchor] = Anchor(path, from_layer=True)
            self.new_value(out, f"layer:{path}", anchor)

    # --------------------------------------------------------------------------------------- functions
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.tracker.skipping or name in _METADATA:
            return func(*args, **kwargs)
        kind = FUNCTIONS.get(name)
        acts = self.activations(args, kwargs)
        site = self.tracker.site(kind) if kind is not None else None
        reader = f"site:{site.key}" if site is not None else "other"
        vids = [self.value_of(a) for a in acts]
        for v in vids:
            self.values[v].readers.append(reader)
        out = func(*args, **kwargs)
        if site is None or not isinstance(out, torch.Tensor):
            return out
        self.sites[site.key] = (site, vids, self._produce(site, vids, acts, args, out))
        return out

    def _produce(self, site: Site, vids: list[int], acts: list[torch.Tensor], args: tuple,
                 out: torch.Tensor) -> int:
        """The output's value: quantized when the op runs quantized (compute) or passes a quantizer on."""
        anchors = [self.values[v].anchor for v in vids]
        if site.kind in COMPUTE:
            ok = bool(vids) and all(anchors) and _structurally_quantizable(site.kind, acts, args)
            anchor = f"site:{site.key}" if ok else None
            if anchor:
                self.anchors[anchor] = Anchor(site.key, from_layer=False)
            return self.new_value(out, f"site:{site.key}", anchor)
        # Transparent: the first activation's quantizer carries over (a ReLU may take it over later).
        return self.new_value(out, f"site:{site.key}", anchors[0] if anchors else None)


def _structurally_quantizable(kind: OpKind, acts: list[torch.Tensor], args: tuple) -> bool:
    if kind in BINARY:
        return len(acts) == 2  # activation (+) activation; a constant operand would need its own quantizer
    if kind is OpKind.CAT:
        tensors = args[0] if args and isinstance(args[0], (list, tuple)) else []
        return len(tensors) >= 1 and len(acts) == len(tensors)
    if kind is OpKind.AVG_POOL:
        x = acts[0] if acts else None
        return x is not None and x.dim() == 4  # NCHW pooling / mean over H, W (checked again in ONNX)
    return len(acts) == 1


def trace_layout(model: nn.Module, example: Inputs | torch.Tensor, layers: dict[str, nn.Module],
                 convs: set[str]) -> Layout:
    """Trace ``model(example)`` (float, eval) and decide the activation quantizers.

    ``layers``: path -> module of every Conv/Linear that will be quantized (their insides are not traced);
    ``convs``: the paths among them whose output is quantized.
    """
    wanted = {id(m) for m in layers.values()}
    tracker = ScopeTracker(model, skip=lambda m: id(m) in wanted)
    tracer = _Tracer(model, tracker, convs)
    tracker.on_enter, tracker.on_exit = tracer.on_enter, tracer.on_exit
    with torch.no_grad(), tracker.active(), tracer:
        out = Inputs.of(example).run(model)
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            tracer.values[tracer.value_of(t)].readers.append("output")
    return _decide(tracer, tracker.counts)


def _decide(tr: _Tracer, counts: dict[tuple[str, OpKind], int]) -> Layout:
    anchors = dict(tr.anchors)
    # ReLU fusion: an anchored value read by exactly one ReLU (and nothing else) is quantized after it.
    for key, (site, vids, _out) in tr.sites.items():
        if site.kind is not OpKind.RELU or len(vids) != 1:
            continue
        v = tr.values[vids[0]]
        if v.anchor is None or v.readers != [f"site:{key}"] or anchors[v.anchor].relu is not None:
            continue
        a = anchors[v.anchor]
        if v.producer != f"{'layer' if a.from_layer else 'site'}:{a.producer}":
            continue  # the ReLU reads a pass-through copy, not the producer's own output
        anchors[v.anchor] = Anchor(a.producer, a.from_layer, relu=key)
    quantized_sites = {}
    for key, (site, _vids, out_vid) in tr.sites.items():
        anchor = tr.values[out_vid].anchor
        if anchor is None or site.kind is OpKind.DROPOUT:
            continue
        if site.kind is OpKind.RELU and anchors[anchor].relu == key:
            continue  # the fused ReLU: the anchor itself sits after it
        quantized_sites[key] = (site, anchor)
    layer_inputs = {}
    for path, vids in tr.layer_inputs.items():
        found = {tr.values[v].anchor for v in vids}
        if len(found) == 1 and None not in found:
            layer_inputs[path] = found.pop()
    layout = Layout(anchors, quantized_sites, layer_inputs, dict(counts))
    log.debug("layout: %d anchors, %d quantized functional sites, %d layers sharing their input quantizer",
              len(anchors), len(quantized_sites), len(layer_inputs))
    return layout

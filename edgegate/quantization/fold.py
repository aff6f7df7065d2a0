"""Fold eval-mode BatchNorm into the convolution that feeds it, before quantization.

Stage: quantize (DESIGN §5), first step of ``--quant int8``. Input: a float model in eval mode and a
few example inputs. Output: a copy in which every ``Conv2d -> BatchNorm2d`` pair whose BatchNorm reads
the conv's output and nothing else does is one ``Conv2d`` (scaled weights, shifted bias) followed by an
``nn.Identity``; plus ``{batchnorm path: conv path}`` of what was folded.

Why: the quantizers must see the weights and activations the deployed graph computes. ONNX Runtime and
the dynamo exporter fold BatchNorm into the Conv themselves (the exporter even keeps the name
``<conv>.weight`` for the folded weight), so a plan calibrated on the unfolded conv would quantize the
wrong weights, and the int8 Conv could not be fused with a BatchNorm after it.

Pairs are found on the model's own forward (module hooks plus a torch function mode that counts every
use of the conv's output), so data-dependent control flow and functional code are followed as they
run. Pairs the example inputs never reach are left alone. The folded model is checked against the
original on the example inputs; a disagreement leaves the model unfolded (and is logged).
"""

from __future__ import annotations

import copy
import logging
import weakref

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from edgegate.data import Inputs

log = logging.getLogger(__name__)

CHECK_RTOL = 1e-3  # folded vs original, relative to the output's largest magnitude


# Calls that read a tensor's metadata, not its values: they are not uses of the conv output.
_METADATA = {"dim", "size", "shape", "dtype", "device", "numel", "is_floating_point", "ndim", "__len__",
             "is_contiguous", "requires_grad", "layout", "is_sparse", "stride", "storage_offset"}


class _UseCounter(TorchFunctionMode):
    """Counts, per watched tensor, the torch function calls outside BatchNorm modules that read its values."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[weakref.ref, int]] = {}  # id(tensor) -> (ref, serial)
        self.uses: list[int] = []  # per serial: an id can be reused once its tensor is freed
        self.in_batchnorm = 0

    def watch(self, t: torch.Tensor) -> int:
        self.uses.append(0)
        self.watched[id(t)] = (weakref.ref(t), len(self.uses) - 1)
        return len(self.uses) - 1

    def serial(self, t: torch.Tensor) -> int | None:
        hit = self.watched.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.in_batchnorm or name in _METADATA or name.startswith("__get__"):
            return func(*args, **kwargs)
        for a in tree_flatten((args, kwargs))[0]:
            serial = self.serial(a) if isinstance(a, torch.Tensor) else None
            if serial is not None:
                self.uses[serial] += 1
        return func(*args, **kwargs)


def find_conv_bn(model: nn.Module, example: Inputs | torch.Tensor) -> dict[str, str]:
    """``{batchnorm path: conv path}`` of the foldable pairs seen on ``model(example)``."""
    path_of = {id(m): p for p, m in model.named_modules()}
    conv_calls: dict[str, int] = {}
    bn_calls: dict[str, int] = {}
    produced: dict[int, str] = {}  # serial of a conv output -> conv path
    fed: dict[str, tuple[str, int]] = {}  # bn path -> (conv path, serial of the conv output it read)
    counter = _UseCounter()

    def conv_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        path = path_of[id(module)]
        conv_calls[path] = conv_calls.get(path, 0) + 1
        if isinstance(out, torch.Tensor):
            produced[counter.watch(out)] = path

    def bn_hook(module: nn.Module, args: tuple) -> None:
        counter.in_batchnorm += 1
        path = path_of[id(module)]
        bn_calls[path] = bn_calls.get(path, 0) + 1
        x = args[0] if args else None
        serial = counter.serial(x) if isinstance(x, torch.Tensor) else None
        if serial is not None:
            fed[path] = (produced[serial], serial)

    def bn_done(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        counter.in_batchnorm -= 1

    handles = []
    for m in model.modules():
        if type(m) is nn.Conv2d:
            handles.append(m.register_forward_hook(conv_hook))
        elif type(m) is nn.BatchNorm2d:
            handles.append(m.register_forward_pre_hook(bn_hook))
            handles.append(m.register_forward_hook(bn_done, always_call=True))
    try:
        with torch.no_grad(), counter:
            Inputs.of(example).run(model)
    finally:
        for h in handles:
            h.remove()
    pairs = {}
    for bn, (conv, serial) in fed.items():
        # One call each, and nothing but the BatchNorm reads the conv output.
        if conv_calls.get(conv) == 1 and bn_calls.get(bn) == 1 and counter.uses[serial] == 0:
            pairs[bn] = conv
    return pairs


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(
            bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        bias = conv.bias.detach() * scale + shift if conv.bias is not None else shift
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))


def fold_batchnorm(model: nn.Module, example: Inputs | torch.Tensor) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` (eval) with each foldable ``Conv2d -> BatchNorm2d`` pair folded; ``model`` is unchanged.

    Returns ``(model, {batchnorm path: conv path})``; when nothing folds, the model itself (no copy).
    """
    if not any(type(m) is nn.BatchNorm2d for m in model.modules()):
        return model, {}
    pairs = find_conv_bn(model.eval(), example)
    if not pairs:
        return model, {}
    folded = copy.deepcopy(model).eval()
    for bn_path, conv_path in pairs.items():
        bn = folded.get_submodule(bn_path)
        if bn.track_running_stats is False or bn.running_var is None:
            continue
        _fold(folded.get_submodule(conv_path), bn)
        parent, _, name = bn_path.rpartition(".")
        setattr(folded.get_submodule(parent), name, nn.Identity())
    with torch.no_grad():
        want, got = Inputs.of(example).run(model), Inputs.of(example).run(folded)
    want, got = (tree_flatten(v)[0] for v in (want, got))
    for w, g in zip(want, got, strict=True):
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            err = float((w - g).abs().max()) if w.numel() else 0.0
            if err > CHECK_RTOL * max(float(w.abs().max()) if w.numel() else 0.0, 1e-6):
                log.warning("BatchNorm folding changed the model's output by %.3g; left unfolded", err)
                return model, {}
    log.info("folded %d BatchNorm layer(s) into their convs", len(pairs))
    return folded, pairs

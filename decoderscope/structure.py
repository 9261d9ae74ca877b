"""Which layers are affine in the latent by construction: read from the decoder's traced graph
(torch.fx), so that a deep chain of linear maps is recognised however its float32 rounding
looks. Anything the trace cannot follow, or any operation not known to be affine, makes a layer
"not known"; those layers are still tested numerically (`estimators.affine.affine_fit`).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .estimators.plan import Structural
from .taps import OUTPUT, entries, pick, tapped

# modules that are affine maps of their input in eval mode (interpolation and average pooling
# are linear; BatchNorm is affine when it normalises with its running statistics)
_AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# tensor reshaping and indexing: each output entry is one input entry
_SHAPE_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "squeeze",
    "unsqueeze", "expand", "repeat", "flip", "narrow",
}  # fmt: skip
_SHAPE_FUNCTIONS: set[Any] = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.flip, torch.narrow, operator.getitem, operator.neg, operator.pos,
}  # fmt: skip
_SUMS: set[Any] = {operator.add, operator.sub, torch.add, torch.sub}
_SCALINGS: set[Any] = {operator.mul, operator.truediv, torch.mul, torch.div}

CONST, AFFINE, OTHER = 0, 1, 2


def _module_kind(module: nn.Module) -> int:
    if isinstance(module, _NORMS):
        return AFFINE if module.track_running_stats and module.running_mean is not None else OTHER
    return AFFINE if isinstance(module, _AFFINE_MODULES) else OTHER


def _args(node: fx.Node) -> list[Any]:
    return list(node.args) + list(node.kwargs.values())


def _kind(node: fx.Node, kinds: dict[fx.Node, int], modules: dict[str, nn.Module]) -> int:
    """CONST (no dependence on the input), AFFINE or OTHER for one node, given its inputs."""
    if node.op == "get_attr":
        return CONST
    if (node.op == "call_function" and node.target is getattr) or (
        node.op == "call_method" and node.target in ("size", "dim")
    ):
        return CONST  # shapes and sizes: metadata, the same for every z
    inputs = [kinds[n] for n in _flat_nodes(_args(node))]
    if not inputs or max(inputs) == CONST:
        return CONST
    if max(inputs) == OTHER:
        return OTHER
    if node.op == "call_module":
        return _module_kind(modules[str(node.target)])
    if node.op == "call_method":
        return AFFINE if node.target in _SHAPE_METHODS else OTHER
    target = node.target
    if node.op != "call_function":
        return OTHER
    if target in _SHAPE_FUNCTIONS or target in _SUMS or target is torch.cat:
        return AFFINE
    if target in _SCALINGS:  # affine times a constant, or divided by one; never affine x affine
        first = max((kinds[n] for n in _flat_nodes(node.args[:1])), default=CONST)
        rest = max((kinds[n] for n in _flat_nodes(node.args[1:])), default=CONST)
        if target in (operator.truediv, torch.div):
            return AFFINE if rest == CONST else OTHER
        return AFFINE if CONST in (first, rest) else OTHER
    return OTHER


def _flat_nodes(args: Sequence[Any]) -> list[fx.Node]:
    out: list[fx.Node] = []

    def keep(n: fx.Node) -> fx.Node:
        out.append(n)
        return n

    fx.node.map_arg(tuple(args), keep)
    return out


def _entry(value: Any, key: str | int | None) -> Any:
    """The traced node the taps read as `output` (`taps.select_output`): the `key` entry of a
    tuple, list or dict return value, or its first traced entry."""
    items = entries(value)
    if items is None:
        return value
    if key is None:
        return next((item for _, item in items if isinstance(item, fx.Node)), None)
    found = pick(items, key)
    return None if found is None else found[1]


@dataclass(frozen=True)
class Layout:
    """What the traced graph says about the chosen layers: those affine in z, and those that are
    injective functions of one affine module's output (layer -> that module's name)."""

    affine: frozenset[str]
    injective: dict[str, str]


def _injective_source(
    node: fx.Node, kinds: dict[fx.Node, int], sources: dict[fx.Node, str], module: nn.Module | None
) -> str | None:
    """The affine module an injective map `node` follows: through strictly monotone elementwise
    activations, Linear maps of full column rank and reshapes, from a module found AFFINE."""
    inputs = _flat_nodes(_args(node))
    if len(inputs) != 1:
        return None
    (u,) = inputs
    if u in sources:
        src = sources[u]
    elif kinds[u] == AFFINE and u.op == "call_module":
        src = str(u.target)
    else:
        return None
    if node.op == "call_method":
        return src if node.target in _SHAPE_METHODS else None
    if node.op == "call_function":
        return src if node.target in _SHAPE_FUNCTIONS - {operator.getitem} else None
    if node.op != "call_module" or module is None:
        return None
    if _monotone(module) or isinstance(module, nn.Flatten | nn.Unflatten | nn.Identity):
        return src
    if isinstance(module, nn.Dropout) or (isinstance(module, nn.Linear) and _full_column(module)):
        return src
    return None


def _monotone(module: nn.Module) -> bool:
    """A strictly increasing elementwise activation: injective on any input."""
    if isinstance(module, nn.LeakyReLU):
        return module.negative_slope > 0
    if isinstance(module, nn.PReLU):
        return bool((module.weight > 0).all())
    if isinstance(module, nn.ELU | nn.CELU):
        return module.alpha > 0
    if isinstance(module, nn.Softplus):
        return module.beta > 0
    return isinstance(module, nn.Tanh | nn.Sigmoid | nn.SELU | nn.Softsign | nn.LogSigmoid)


def _full_column(linear: nn.Linear) -> bool:
    """W [out, in] of rank `in`: injective on all of its input space."""
    w = linear.weight.detach().double()
    if w.shape[0] < w.shape[1]:
        return False
    s = torch.linalg.svdvals(w)
    return bool(s.min() > 1e-6 * s.max())


def read_layout(
    decoder: nn.Module, names: Sequence[str], output_key: str | int | None = None
) -> Layout:
    """Which of `names` (module names, or OUTPUT: the `output_key` entry of the return value)
    are affine in the decoder's input by construction in eval mode, and which are injective
    functions of an affine module. Nothing is known where the decoder cannot be traced."""
    try:
        graph = fx.symbolic_trace(decoder).graph
    except Exception:  # noqa: BLE001 - any trace failure: nothing is known structurally
        return Layout(frozenset(), {})
    modules = dict(decoder.named_modules())
    kinds: dict[fx.Node, int] = {}
    sources: dict[fx.Node, str] = {}
    calls: dict[str, list[fx.Node]] = {}
    out: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            kinds[node] = AFFINE if not kinds else CONST  # the first input is z
            continue
        if node.op == "output":
            entry = _entry(node.args[0], output_key)
            if isinstance(entry, fx.Node) and OUTPUT in names:
                out[OUTPUT] = entry
            continue
        kinds[node] = _kind(node, kinds, modules)
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if kinds[node] == OTHER:
            src = _injective_source(node, kinds, sources, module)
            if src is not None and len(calls.get(src, [])) == 1:
                sources[node] = src
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    for name in names:
        if len(calls.get(name, [])) == 1:  # a module called twice is tapped ambiguously
            out[name] = calls[name][0]
    affine = frozenset(n for n, node in out.items() if kinds[node] == AFFINE)
    injective = {n: sources[node] for n, node in out.items() if node in sources}
    return Layout(affine, injective)


def float64_layers(
    decoders: Sequence[nn.Module],
    names: Sequence[str],
    stack: ExitStack,
    output_key: str | int | None,
    keyed: Callable[[int, str], str],
) -> Structural | None:
    """Each decoder's `read_layout`, with float64 copies of the decoders that compute those
    layers (and the affine modules the injective ones follow), tapped for the life of `stack`
    (copy before any hook is on them); layer k/name is named `keyed(k, name)`. None where the
    graphs show nothing."""
    taps = {}
    affine: set[str] = set()
    injective: dict[str, str] = {}
    for k, decoder in enumerate(decoders):
        layout = read_layout(decoder, names, output_key)
        layers = sorted(set(layout.affine) | set(layout.injective) | set(layout.injective.values()))
        if not layers:
            continue
        try:
            copy64 = copy.deepcopy(decoder).double()
        except (RuntimeError, TypeError):  # a decoder that cannot be copied or cast
            continue
        taps[k] = stack.enter_context(tapped(copy64, layers, output_key))
        affine |= {keyed(k, n) for n in layout.affine}
        injective |= {keyed(k, n): keyed(k, src) for n, src in layout.injective.items()}
    if not taps:
        return None

    def features64(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {keyed(k, n): h for k, tap in taps.items() for n, h in tap(z).items()}

    return Structural(frozenset(affine), injective, features64)

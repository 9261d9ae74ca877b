"""Which layers are affine in the latent by construction: read from the decoder's traced graph
(torch.fx), so that a deep chain of linear maps is recognised however its float32 rounding
looks. Anything the trace cannot follow, or any operation not known to be affine, makes a layer
"not known"; those layers are still tested numerically (`estimators.affine.affine_fit`).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .estimators.plan import Structural
from .taps import OUTPUT, entries, modes_restored, pick, tapped

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
_CONVS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)  # fmt: skip
# a convolution's matrix is built (float64) and its rank read only up to these sizes
MAX_CONV_INPUTS = 4096
MAX_CONV_ENTRIES = 1 << 23
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
    copies: dict[str, str] = field(default_factory=dict)


# reshapes that keep every entry (no narrow, getitem or expand): a layer reached from another
# through these alone holds that layer's values, in another shape
_COPY_METHODS = _SHAPE_METHODS - {"expand", "repeat", "narrow"}
_COPY_FUNCTIONS = _SHAPE_FUNCTIONS - {torch.narrow, operator.getitem, operator.neg, operator.pos}
_COPY_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)


def _copied(node: fx.Node, kinds: dict[fx.Node, int], modules: dict[str, nn.Module]) -> Any:
    """The node whose value `node` reshapes (every other input a constant), or None."""
    if node.op == "call_module":
        if not isinstance(modules.get(str(node.target)), _COPY_MODULES):
            return None
    elif node.op == "call_method":
        if node.target not in _COPY_METHODS:
            return None
    elif node.op != "call_function" or node.target not in _COPY_FUNCTIONS:
        return None
    inputs = _flat_nodes(_args(node))
    if not inputs or any(kinds[n] != CONST for n in inputs[1:]) or inputs[0] is not node.args[0]:
        return None
    return inputs[0]


def _injective_source(
    node: fx.Node, kinds: dict[fx.Node, int], sources: dict[fx.Node, str], module: nn.Module | None
) -> str | None:
    """The affine module an injective map `node` follows: through strictly monotone elementwise
    activations, Linear maps and convolutions of full column rank (at the shapes propagated)
    and reshapes, from a module found AFFINE."""
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
    if isinstance(module, _CONVS) and _full_column_conv(module, _shape(u), _shape(node)):
        return src
    return None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The node's output shape from `ShapeProp` (None where it was not propagated)."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


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
    return _full_column_rank(linear.weight.detach().double())


def _full_column_rank(matrix: torch.Tensor) -> bool:
    """matrix [rows, columns] (float64) of rank `columns`: smallest singular value above 1e-6 of
    the largest."""
    if matrix.shape[0] < matrix.shape[1]:
        return False
    s = torch.linalg.svdvals(matrix)
    return bool(s.min() > 1e-6 * s.max())


def _full_column_conv(
    conv: nn.Module, shape_in: tuple[int, ...] | None, shape_out: tuple[int, ...] | None
) -> bool:
    """A convolution injective on its input space at the shapes it is called with: its matrix,
    built in float64 by applying it (bias removed) to the standard basis, has full column rank.
    Built only for at most MAX_CONV_INPUTS inputs and MAX_CONV_ENTRIES entries (a 4096 x 2048
    matrix); larger ones are not known injective."""
    if shape_in is None or shape_out is None:
        return False
    n_in, n_out = math.prod(shape_in[1:]), math.prod(shape_out[1:])
    if n_out < n_in or n_in > MAX_CONV_INPUTS or n_in * n_out > MAX_CONV_ENTRIES:
        return False
    conv64 = copy.deepcopy(conv).double()
    if getattr(conv64, "bias", None) is not None:
        conv64.register_parameter("bias", None)
    with torch.no_grad():
        basis = torch.eye(n_in, dtype=torch.float64).view(n_in, *shape_in[1:])
        matrix = conv64(basis).reshape(n_in, -1)
    return matrix.shape[1] == n_out and _full_column_rank(matrix.T)


def _propagate_shapes(module: fx.GraphModule, latent_shape: tuple[int, ...] | None) -> None:
    """Each node's shape (`node.meta["tensor_meta"]`) from one pass of two z = 0, in the
    decoder's dtype, in eval mode (a BatchNorm in training mode would update its running
    statistics), the caller's modes and RNG state kept; nothing where that pass fails
    (convolutions are then not known injective)."""
    if latent_shape is None:
        return
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else None
    z = torch.zeros((2, *latent_shape), dtype=dtype, device=device)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), modes_restored(module):
            module.eval()
            ShapeProp(module).propagate(z)
    except Exception:  # noqa: BLE001 - shapes are optional knowledge
        return


def read_layout(
    decoder: nn.Module,
    names: Sequence[str],
    output_key: str | int | None = None,
    latent_shape: tuple[int, ...] | None = None,
) -> Layout:
    """Which of `names` (module names, or OUTPUT: the `output_key` entry of the return value)
    are affine in the decoder's input by construction in eval mode, and which are injective
    functions of an affine module. Nothing is known where the decoder cannot be traced;
    convolutions are known injective only given `latent_shape` (the decoder's input shape
    without the batch), which fixes the shapes they are called with."""
    try:
        traced = fx.symbolic_trace(decoder)
    except Exception:  # noqa: BLE001 - any trace failure: nothing is known structurally
        return Layout(frozenset(), {})
    _propagate_shapes(traced, latent_shape)
    graph = traced.graph
    modules = dict(decoder.named_modules())
    kinds: dict[fx.Node, int] = {}
    sources: dict[fx.Node, str] = {}
    calls: dict[str, list[fx.Node]] = {}
    out: dict[str, fx.Node] = {}
    roots: dict[fx.Node, fx.Node] = {}  # node -> the node whose values it reshapes
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
        if (u := _copied(node, kinds, modules)) is not None:
            roots[node] = roots.get(u, u)
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
    name_of: dict[fx.Node, str] = {}  # a node tapped twice (`output` and its module) is read
    for n in sorted(out, key=lambda n: n == OUTPUT):  # as the module
        name_of.setdefault(out[n], n)
    copies = {}
    for n, node in out.items():
        src = name_of.get(roots.get(node, node))
        if src is not None and src != n:
            copies[n] = src
    return Layout(affine, injective, copies)


def float64_layers(
    decoders: Sequence[nn.Module],
    names: Sequence[str],
    stack: ExitStack,
    output_key: str | int | None,
    keyed: Callable[[int, str], str],
    latent_shape: tuple[int, ...] | None = None,
) -> Structural | None:
    """Each decoder's `read_layout`, with float64 copies of the decoders that compute those
    layers (and the affine modules the injective ones follow), tapped for the life of `stack`
    (copy before any hook is on them), and the layers that reshape another; layer k/name is
    named `keyed(k, name)`. None where the graphs show nothing."""
    taps = {}
    affine: set[str] = set()
    injective: dict[str, str] = {}
    copies: dict[str, str] = {}
    for k, decoder in enumerate(decoders):
        layout = read_layout(decoder, names, output_key, latent_shape)
        copies |= {keyed(k, n): keyed(k, src) for n, src in layout.copies.items()}
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
    if not taps and not copies:
        return None

    def features64(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {keyed(k, n): h for k, tap in taps.items() for n, h in tap(z).items()}

    return Structural(frozenset(affine), injective, features64, copies)

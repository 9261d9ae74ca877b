"""Forward hooks on a decoder: the one place where hooks are registered and removed.

A layer's value is its module's forward output. Outputs that are tuples or lists use their first
tensor element, dicts their first tensor value (insertion order): the "first tensor" rule, which
the report states where it was applied. The special name `output` is the decoder's return value.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import nn

from .errors import DecoderError, DecoderscopeError, LayerError

OUTPUT = "output"


def grad_mode(z: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """How to run the decoder on z: under inference mode, except for Jacobians
    (`estimators.inverse`): with autograd when z requires grad (reverse mode), under no_grad when
    z carries a forward-mode tangent, which inference mode would drop."""
    if z.requires_grad:
        return torch.enable_grad()
    if fwad.unpack_dual(z).tangent is not None:
        return torch.no_grad()
    return torch.inference_mode()


def entries(value: Any) -> list[tuple[Any, Any]] | None:
    """(key, item) of a dict's items or a tuple/list's elements; None for anything else."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, tuple | list):
        return list(enumerate(value))
    return None


def pick(items: list[tuple[Any, Any]], key: str | int) -> tuple[Any, Any] | None:
    """The (key, item) whose key is `key` (a dict key, or a sequence index given as int or
    text), or None."""
    return next(((k, item) for k, item in items if str(k) == str(key)), None)


def first_tensor(value: Any) -> tuple[torch.Tensor | None, bool]:
    """The tensor a module output stands for, and whether the first-tensor rule was needed."""
    if isinstance(value, torch.Tensor):
        return value, False
    for _, item in entries(value) or []:
        if isinstance(item, torch.Tensor):
            return item, True
    return None, False


def select_output(value: Any, key: str | int | None = None) -> tuple[torch.Tensor, str | None]:
    """The tensor the decoder's return value stands for, and which entry of it that is ("[0]",
    "['recon']"; None for a plain tensor). `key` picks a dict's key or a sequence's index;
    without it the first tensor is used."""
    if isinstance(value, torch.Tensor) and key is None:
        return value, None
    items = entries(value)
    if items is None:
        what = "a tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise LayerError(
            f"output key {key!r} given, but the decoder returns {what}"
            + ("; leave the output key out" if isinstance(value, torch.Tensor) else "")
        )
    tensors = [(k, item) for k, item in items if isinstance(item, torch.Tensor)]
    found = pick(items, key) if key is not None else next(iter(tensors), None)
    if found is None or not isinstance(found[1], torch.Tensor):
        if key is None:
            raise LayerError(
                f"the decoder returned {type(value).__name__}, which holds no tensor; make it "
                "return a tensor (or a tuple/dict holding the output)"
            )
        raise LayerError(
            f"output key {key!r} is not a tensor entry of the decoder's {type(value).__name__} "
            f"output (entries {[k for k, _ in items]}, tensors at {[k for k, _ in tensors]}); "
            "pick one of those"
        )
    return found[1], f"[{found[0]!r}]"


@contextmanager
def modes_restored(module: nn.Module | None) -> Iterator[None]:
    """Restore every submodule's train/eval flag in `finally`, whatever the body does."""
    training = {m: m.training for m in module.modules()} if module is not None else {}
    try:
        yield
    finally:
        for m, flag in training.items():
            m.training = flag


def _contiguous(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    first = args[0] if args else None
    if isinstance(first, torch.Tensor) and not first.is_contiguous():
        return (first.contiguous(), *args[1:])
    return args


@contextmanager
def _hooked(
    decoder: nn.Module, hooks: dict[str, Callable[[nn.Module, Any, Any], Any]]
) -> Iterator[None]:
    """Register `hooks` (module name -> forward hook), put the decoder in eval mode, and undo
    both in `finally`: every hook removed, every submodule's train/eval flag restored. Every
    GroupNorm also gets its input made contiguous (the same values): its forward-mode derivative
    fails on a strided input ("view size is not compatible ..."), which diffusers' AutoencoderKL
    hands it after its attention block, and the refined inverse's Jacobians need that mode."""
    modules = dict(decoder.named_modules())
    handles = []
    with modes_restored(decoder):
        try:
            decoder.eval()
            for name, hook in hooks.items():
                handles.append(modules[name].register_forward_hook(hook))
            for module in modules.values():
                if isinstance(module, nn.GroupNorm):
                    handles.append(module.register_forward_pre_hook(_contiguous))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _run(decoder: nn.Module, z: torch.Tensor, fired: Sequence[str]) -> Any:
    """Call the decoder (in `grad_mode(z)`); a failure is re-raised naming the layers that had
    run."""
    try:
        with grad_mode(z):
            return decoder(z)
    except DecoderscopeError:
        raise
    except Exception as exc:
        ran = ", ".join(fired) if fired else "none"
        raise DecoderError(
            f"the decoder raised {type(exc).__name__}: {exc} (on input of shape "
            f"{list(z.shape)}; tapped layers that had run: {ran}). Check that the decoder "
            "accepts latent samples of that shape"
        ) from exc


@dataclass(frozen=True)
class LayerInfo:
    """One decoder module as found by a probe forward pass."""

    name: str
    type: str
    shape: tuple[int, ...]  # per-sample output shape (batch dimension dropped)
    params: int
    calls: int
    first_tensor_rule: bool


@dataclass
class Probe:
    """What one forward pass showed: modules in execution order, and the decoder's output."""

    layers: list[LayerInfo]
    output_shape: tuple[int, ...]
    output_is_last_layer: bool
    order: list[str] = field(default_factory=list)  # every module that fired, by output time

    def default_layers(self) -> list[str]:
        """Parametrised leaf modules called once, in execution order, then `output` unless
        the last of them already is the decoder's output."""
        chosen = [info.name for info in self.layers if info.params > 0 and info.calls == 1]
        last_is_output = bool(chosen) and chosen[-1] == self._last_name()
        if not (last_is_output and self.output_is_last_layer):
            chosen.append(OUTPUT)
        return chosen

    def _last_name(self) -> str | None:
        return self.layers[-1].name if self.layers else None


def probe(decoder: nn.Module, z: torch.Tensor) -> Probe:
    """Run the decoder once on `z` with a hook on every leaf module (and every named module for
    call counts), recording execution order, output shapes and call counts."""
    names = [n for n, _ in decoder.named_modules() if n]
    modules = dict(decoder.named_modules())
    order: list[str] = []
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    rule: dict[str, bool] = {}
    outputs: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in order:
                order.append(name)
            tensor, used = first_tensor(out)
            if tensor is not None and name not in shapes:
                shapes[name] = tuple(tensor.shape[1:])
                rule[name] = used
                outputs[name] = tensor

        return hook

    with _hooked(decoder, {n: make(n) for n in names}):
        out = _run(decoder, z, order)
    out_tensor, _ = first_tensor(out)
    if out_tensor is None:
        raise LayerError(
            f"the decoder returned {type(out).__name__}, which holds no tensor; "
            "make it return a tensor (or a tuple/dict whose first tensor is the output)"
        )
    layers = []
    for name in order:
        module = modules[name]
        is_leaf = next(iter(module.children()), None) is None
        if not is_leaf:
            continue
        layers.append(
            LayerInfo(
                name=name,
                type=type(module).__name__,
                shape=shapes.get(name, ()),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                calls=calls[name],
                first_tensor_rule=rule.get(name, False),
            )
        )
    last = layers[-1].name if layers else None
    is_last = last is not None and outputs.get(last) is out_tensor
    return Probe(layers, tuple(out_tensor.shape[1:]), is_last, order=order)


def resolve_layers(decoder: nn.Module, requested: Sequence[str] | None, found: Probe) -> list[str]:
    """Turn requested names or glob patterns into module names, in execution order.

    `None` gives the default layers. Unknown names raise `LayerError` listing the valid ones.
    """
    if requested is None:
        return found.default_layers()
    if isinstance(requested, str):
        requested = [requested]
    valid = [n for n, _ in decoder.named_modules() if n] + [OUTPUT]
    chosen: list[str] = []
    for pattern in requested:
        pattern = pattern.strip()
        if pattern == "latent":
            continue  # always the first row
        matches = [n for n in valid if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise LayerError(
                f"unknown layer {pattern!r}; valid names are: {', '.join(valid)} "
                "(`decoderscope layers CHECKPOINT` lists them with types and shapes)"
            )
        chosen.extend(m for m in matches if m not in chosen)
    # order of outputs (a container's output comes after its children's); `output` last
    rank = {name: k for k, name in enumerate(found.order)}
    rank[OUTPUT] = len(rank) + 1
    return sorted(chosen, key=lambda n: rank.get(n, len(rank)))


class _Enough(BaseException):
    """Raised by the hook of the last layer a pass needs, to stop the decoder there. Not an
    Exception, so a decoder's own `except Exception` cannot swallow it."""


class Tap:
    """Runs the decoder and returns every chosen layer's value from ONE forward pass."""

    def __init__(
        self, decoder: nn.Module, names: Sequence[str], output_key: str | int | None = None
    ) -> None:
        self.decoder = decoder
        self.names = list(names)
        self.output_key = output_key
        self.output_entry: str | None = None  # which entry of the return value `output` read
        self._captured: dict[str, torch.Tensor] = {}
        self._fired: list[str] = []
        self._last: str | None = None
        self._patch: Mapping[str, torch.Tensor] = {}

    def hook(self, name: str) -> Callable[[nn.Module, Any, Any], torch.Tensor | None]:
        def capture(_m: nn.Module, _i: Any, out: Any) -> torch.Tensor | None:
            if name in self._captured:
                raise LayerError(
                    f"layer {name!r} was called more than once in one decoder forward pass; "
                    "a reused module has no single output to inspect: leave it out of `layers`"
                )
            tensor, _ = first_tensor(out)
            if tensor is None:
                raise LayerError(
                    f"layer {name!r} returned {type(out).__name__} with no tensor in it; "
                    "leave it out of `layers`"
                )
            patched = self._patch.get(name) if isinstance(out, torch.Tensor) else None
            self._captured[name] = tensor if patched is None else patched
            self._fired.append(name)
            if name == self._last:
                raise _Enough
            return patched  # None: the module's own output goes on

        return capture

    def __call__(
        self,
        z: torch.Tensor,
        last: str | None = None,
        patch: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decode z [B, *latent_shape]; return {name: output [B, ...]} for every chosen layer.
        With `last` (a chosen layer other than `output`) the decoder stops once that layer has
        run, and only the chosen layers run by then are returned: the rest of the decoder is
        not computed for a read of the layers before it. `patch` {name: tensor}: those layers
        (whose modules return a plain tensor) pass the given tensor on instead of their own
        output (`dependence.determined`)."""
        self._captured = {}
        self._fired = []
        self._last = last
        self._patch = patch or {}
        try:
            out = _run(self.decoder, z, self._fired)
        except _Enough:
            return dict(self._captured)
        finally:
            self._last = None
            self._patch = {}
        if OUTPUT in self.names or self.output_key is not None:
            tensor, self.output_entry = select_output(out, self.output_key)
            if OUTPUT in self.names:
                self._captured[OUTPUT] = tensor
        missing = [n for n in self.names if n not in self._captured]
        if missing:
            raise LayerError(
                f"chosen layer(s) {', '.join(map(repr, missing))} never ran in the decoder's "
                "forward pass; choose modules the forward pass calls "
                "(`decoderscope layers CHECKPOINT` shows them)"
            )
        return {n: self._captured[n] for n in self.names}


@contextmanager
def tapped(
    decoder: nn.Module, names: Sequence[str], output_key: str | int | None = None
) -> Iterator[Tap]:
    """Context manager: hooks on `names` for its lifetime, all removed and modes restored after.
    `output_key` picks the entry of a tuple/dict return value that `output` reads."""
    modules = dict(decoder.named_modules())
    tap = Tap(decoder, names, output_key)
    hooks = {n: tap.hook(n) for n in names if n != OUTPUT and n in modules}
    with _hooked(decoder, hooks):
        yield tap

"""Checkpoints, safe by default: `torch.load(weights_only=True)` unless the user says `--trust`.

Bundle format `decoderscope.checkpoint/1` (a dict): format, factory ("module:callable" or
"path/file.py:callable"), kwargs, state_dict, data (optional tensor [N, ...]).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect as pyinspect
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, DataError

FORMAT = "decoderscope.checkpoint/1"


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    factory: str,
    kwargs: dict[str, Any] | None = None,
    data: torch.Tensor | None = None,
    likelihood: str | None = None,
) -> None:
    """Write a bundle that `decoderscope inspect PATH` can use with nothing else.

    factory: "module:callable" (or "path/file.py:callable") that builds the model from kwargs;
    kwargs must be plain values (numbers, strings, lists, dicts) so the file loads safely.
    likelihood: the model's p(x|z) as a spec ('gaussian:SIGMA', 'bernoulli', ...), used when
    the command line gives none.
    """
    _split_factory(factory)  # fail early on a malformed spec
    if likelihood is not None:
        from .likelihood import parse_likelihood

        if not isinstance(likelihood, str):
            raise CheckpointError("a bundle stores the likelihood as a spec string, not a callable")
        parse_likelihood(likelihood)
    bundle: dict[str, Any] = {
        "format": FORMAT,
        "factory": factory,
        "kwargs": dict(kwargs or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if data is not None:
        bundle["data"] = torch.as_tensor(data).detach().cpu()
    if likelihood is not None:
        bundle["likelihood"] = likelihood
    torch.save(bundle, path)


@dataclass(frozen=True)
class Loaded:
    model: nn.Module
    data: torch.Tensor | None
    source: str
    likelihood: str | None = None
    path: Path | None = None


def _split_factory(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise CheckpointError(
            f"model factory must look like 'module:callable' or 'path/to/file.py:callable', "
            f"got {spec!r}"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise CheckpointError(f"model factory {spec!r} is missing the module or the callable")
    return target, attr


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """Import the callable named by 'module:callable' or 'path/file.py:callable'."""
    target, attr = _split_factory(spec)
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise CheckpointError(f"model file {target!r} does not exist")
            name = f"_decoderscope_user_{file.stem}"
            module_spec = importlib.util.spec_from_file_location(name, file)
            if module_spec is None or module_spec.loader is None:
                raise CheckpointError(f"cannot import {target!r} as a Python file")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except CheckpointError:
        raise
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"cannot import {target!r} for model factory {spec!r}: {exc}. Python looks for it "
            f"on sys.path: run from the folder that holds it, add that folder to PYTHONPATH "
            f"(PYTHONPATH=path/to/folder decoderscope ...), or name the file itself: --model "
            f"path/to/{target.rpartition('.')[2]}.py:{attr}"
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"cannot import {target!r} for model factory {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CheckpointError(f"{target!r} has no callable {attr!r} (model factory {spec!r})")
    return fn


def _build(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    fn = resolve_factory(spec)
    try:
        sig = pyinspect.signature(fn)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        usable = kwargs if accepts_any else {k: v for k, v in kwargs.items() if k in sig.parameters}
    except (TypeError, ValueError):
        usable = kwargs
    try:
        model = fn(**usable)
    except Exception as exc:
        raise CheckpointError(
            f"model factory {spec!r} raised {type(exc).__name__}: {exc} when called with "
            f"{sorted(usable)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _load_state(model: nn.Module, state: dict[str, Any], spec: str) -> None:
    own = set(model.state_dict())
    keys = set(state)
    if keys and not keys & own:  # Lightning-style prefix, e.g. "model.encoder..."
        prefixes = {k.split(".", 1)[0] for k in keys if "." in k}
        if len(prefixes) == 1:
            prefix = prefixes.pop() + "."
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            keys = set(state)
    missing, unexpected = sorted(own - keys), sorted(keys - own)
    shape_bad = [
        k
        for k in sorted(own & keys)
        if isinstance(state[k], torch.Tensor) and state[k].shape != model.state_dict()[k].shape
    ]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if shape_bad:
            parts.append(
                "shape mismatch at "
                + ", ".join(
                    f"{k} (file {list(state[k].shape)}, model {list(model.state_dict()[k].shape)})"
                    for k in shape_bad[:5]
                )
            )
        raise CheckpointError(
            f"the state_dict does not fit the model built by {spec!r}: "
            + "; ".join(parts)
            + ". Check --model and its arguments"
        )
    model.load_state_dict(state)


def _archive_kind(path: Path) -> str | None:
    """'torchscript' or 'export' for archives that hooks cannot inspect, else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        if any("archive_format" in n or "exported_program" in n for n in names):
            return "export"
    if any(n.split("/", 1)[-1].startswith("code/") for n in names) or any(
        n.endswith("constants.pkl") for n in names
    ):
        return "torchscript"
    return None


def load_checkpoint(path: str | Path, model: str | None = None, trust: bool = False) -> Loaded:
    """Load a model (and any bundled data) from a checkpoint.

    Accepted: a decoderscope bundle; a plain state_dict or a Lightning-style
    {"state_dict", "hyper_parameters"} with `model` = factory spec; a whole pickled module only
    with `trust=True` (this runs code from the file). TorchScript and torch.export archives are
    refused: forward hooks do not run inside them.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    kind = _archive_kind(p)
    if kind is not None:
        what = "a TorchScript archive" if kind == "torchscript" else "a torch.export archive"
        raise CheckpointError(
            f"{p.name} is {what}; forward hooks do not run inside it, so its layers cannot be "
            "inspected. Save the eager model's state_dict instead (torch.save(model.state_dict(), "
            "PATH)) and pass --model module:factory"
        )
    _check_torch_file(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            needed = _unsafe_globals(p)
            raise CheckpointError(
                f"{p.name} holds pickled Python objects ({', '.join(needed) or 'unknown classes'})"
                ", which safe loading refuses. Loading it would run code from the file: if you "
                "trust it, pass --trust; better, save a state_dict and pass --model"
            ) from exc
        warnings.warn(
            f"loading {p.name} with weights_only=False: this runs code from the file",
            stacklevel=2,
        )
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise CheckpointError(f"cannot load {p.name}: {type(exc2).__name__}: {exc2}") from exc2
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {p.name}: {type(exc).__name__}: {exc}. The file may be corrupt or "
            "truncated; save it again"
        ) from exc
    return replace(_interpret(obj, p, model), path=p)


def _check_torch_file(p: Path) -> None:
    """Refuse a file that is neither a zip archive (torch.save's format) nor a pickle (its
    legacy format) before torch.load reads it as one and fails obscurely."""
    with p.open("rb") as f:
        head = f.read(16)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (maybe truncated), or a pickle
        return
    shown = head.decode("utf-8", "replace").strip() or "nothing"
    raise CheckpointError(
        f"{p.name} is not a torch checkpoint: it starts with {shown!r}, not a torch.save archive. "
        "Save the model with ds.save_checkpoint(...) or torch.save(model.state_dict(), PATH)"
    )


def _unsafe_globals(p: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(p))
    except Exception:
        return []


def _interpret(obj: Any, p: Path, model: str | None) -> Loaded:
    if isinstance(obj, nn.Module):
        return Loaded(obj, None, str(p))
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        spec = model or obj["factory"]
        built = _build(spec, dict(obj.get("kwargs") or {}))
        _load_state(built, obj["state_dict"], spec)
        data = obj.get("data")
        like = obj.get("likelihood")
        return Loaded(
            built,
            data if isinstance(data, torch.Tensor) else None,
            f"{p} ({spec})",
            like if isinstance(like, str) else None,
        )
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if model is None:
            raise CheckpointError(
                f"{p.name} is a Lightning-style checkpoint (state_dict + hyper_parameters); "
                "pass --model module:factory to build the model it belongs to"
            )
        hparams = obj.get("hyper_parameters") or {}
        built = _build(model, dict(hparams) if isinstance(hparams, dict) else {})
        _load_state(built, obj["state_dict"], model)
        return Loaded(built, None, f"{p} ({model})")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if model is None:
            raise CheckpointError(
                f"{p.name} is a plain state_dict (weights only); pass --model module:factory "
                "(or path/to/file.py:factory) to build the model it belongs to"
            )
        built = _build(model, {})
        _load_state(built, obj, model)
        return Loaded(built, None, f"{p} ({model})")
    raise CheckpointError(
        f"{p.name} holds a {type(obj).__name__}, not a model, a state_dict or a decoderscope "
        "bundle; see docs/checkpoints.md for the accepted formats"
    )


def load_data(path: str | Path) -> torch.Tensor:
    """Data from a .pt tensor (safe load), a .npy array or an .npz archive (its `data` or `x`
    entry, else its only array): [N, ...]."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        if p.suffix == ".npy":
            return torch.from_numpy(np.load(p, allow_pickle=False))
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                keys = list(npz.keys())
                key = next((k for k in ("data", "x") if k in keys), None)
                if key is None and len(keys) == 1:
                    key = keys[0]
                if key is None:
                    raise DataError(
                        f"{p.name} holds arrays {keys}; name the data array `data` or `x`"
                    )
                return torch.from_numpy(npz[key])
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot read data from {p.name}: {type(exc).__name__}: {exc}. Use a .pt tensor, "
            ".npy or .npz file"
        ) from exc
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("data", "x") if k in obj), obj)
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{p.name} holds a {type(obj).__name__}, not a tensor of data [N, ...]")
    return obj

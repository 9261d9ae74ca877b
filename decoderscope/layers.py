"""`decoderscope layers`: the decoder's modules from torchinfo, with the default selection."""

from __future__ import annotations

from typing import Any

import torch
from rich.table import Table
from torch import nn
from torchinfo import summary

from .errors import DecoderscopeError
from .model import VAE, resolve_decoder
from .sampling import as_data_tensor, encode_all
from .taps import modes_restored, probe


def _latent_example(vae: VAE, model: nn.Module, data: torch.Tensor | None) -> torch.Tensor:
    if data is not None:
        post = encode_all(vae, as_data_tensor(data)[:2])
        return post.mu
    shape = getattr(model, "latent_shape", None) or getattr(model, "latent_dim", None)
    if shape is None:
        raise DecoderscopeError(
            "cannot tell the latent shape: the checkpoint carries no data and the model has no "
            "`latent_dim`/`latent_shape` attribute; pass --data PATH"
        )
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.zeros(2, *dims)


def describe(model: nn.Module, data: torch.Tensor | None) -> dict[str, Any]:
    """{latent_shape, layers: [{name, type, output_shape, params, default, depth}]}."""
    vae = VAE.from_model(model)
    z = _latent_example(vae, model, data)
    decoder, _ = resolve_decoder(vae.decoder, z)
    found = probe(decoder, z)
    default = set(found.default_layers())
    names = {id(m): n for n, m in decoder.named_modules()}
    with modes_restored(decoder):
        stats = summary(decoder, input_data=z, verbose=0, depth=10)
    rows = []
    for info in stats.summary_list:
        name = names.get(id(info.module), "")
        if not name:
            continue
        out = info.output_size
        rows.append(
            {
                "name": name,
                "type": info.class_name,
                "output_shape": list(out[1:]) if isinstance(out, list | tuple) else [],
                "params": int(info.num_params) if not info.is_recursive else 0,
                "depth": info.depth,
                "default": name in default,
            }
        )
    rows.append(
        {
            "name": "output",
            "type": "output",
            "output_shape": list(found.output_shape),
            "params": 0,
            "depth": 0,
            "default": "output" in default,
        }
    )
    return {"latent_shape": list(z.shape[1:]), "layers": rows}


def layers_table(info: dict[str, Any]) -> Table:
    t = Table(title=f"decoder layers (latent shape {info['latent_shape']})")
    for col in ("name", "type", "output shape", "params", "inspected by default"):
        t.add_column(col, justify="right" if col == "params" else "left")
    for row in info["layers"]:
        indent = "  " * max(0, row["depth"] - 1)
        t.add_row(
            indent + row["name"],
            row["type"],
            "×".join(map(str, row["output_shape"])),
            f"{row['params']:,}",
            "yes" if row["default"] else "",
        )
    return t

"""Speed: the per-layer method against decoderscope, side by side in one process.

Per-layer method (the paper's plain estimator, written out stand-alone): for each layer
separately, its own decoder passes (the decoder truncated after that layer, so it never pays for
later layers) and its own critic pair (an MLP on (h, mu, logvar) for the conditional KL, an MLP on
h for the aggregate KL; two hidden layers of 64 SiLU units, Adam 2e-3), 2000 steps of 256 fresh
posterior and 256 fresh prior samples; KL, aggregate KL and MI from 4096 fresh posterior samples.
decoderscope: one `ds.inspect` call (seeds=1, random_inits=0, default settings).

Decoders whose truth is known (DESIGN.md section 2): injective linear and conv chains (every
layer equals the exact latent values) and an injective LeakyReLU MLP. Prints wall-time ratios,
each method's largest error against the truth, peak memory, and scaling curves of decoderscope's
time per training step against the number of layers, data points and layer width.

Run: .venv/bin/python benchmarks/speed.py [--quick] [--device cpu|cuda] [--out docs/speed.md]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import decoderscope as ds
from decoderscope.sampling import stream_seed
from decoderscope.testing import (
    conv_latent_shape,
    conv_upsample,
    gaussian_case,
    index_data,
    leaky_mlp,
    linear_chain,
    vae_for,
)

Truth = tuple[float, float, float]


def _status_mib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _reset_peak(device: torch.device) -> float:
    """Start a peak-memory measurement; returns the baseline (MiB) to subtract."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return math.nan
    return _status_mib("VmRSS")


def _peak_mib(device: torch.device, baseline: float) -> float:
    """Peak memory since `_reset_peak` above its baseline: GPU memory allocated by torch, or the
    CPU process's peak resident set (NaN where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - baseline
    return _status_mib("VmHWM") - baseline


def _mlp(d_in: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, 1),
    )


def per_layer_plain(
    prefix: nn.Module,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    steps: int,
    batch: int = 256,
    eval_samples: int = 4096,
    seed: int = 0,
) -> Truth:
    """The paper's method at one layer: (KL, aggregate KL, MI) in nats. prefix(z) -> h is the
    decoder up to and including the layer."""
    device = mu.device
    # hashed like decoderscope's own streams: the cases' data come from Generator(0)
    g = torch.Generator(device=device).manual_seed(stream_seed(seed, "per-layer"))
    torch.manual_seed(stream_seed(seed, "per-layer init"))
    flat_mu, flat_lv = mu.flatten(1), logvar.flatten(1)
    with torch.no_grad():
        width = prefix(mu[:2]).flatten(1).shape[1]
    cond, marg = _mlp(width + 2 * flat_mu.shape[1]).to(device), _mlp(width).to(device)
    opt = torch.optim.Adam([*cond.parameters(), *marg.parameters()], lr=2e-3)
    n = mu.shape[0]

    def draw(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(n, (rows,), generator=g, device=device)
        eps = torch.randn((2 * rows, *mu.shape[1:]), generator=g, device=device)
        zq = mu[idx] + (0.5 * logvar[idx]).exp() * eps[:rows]
        with torch.no_grad():
            h = prefix(torch.cat([zq, eps[rows:]])).flatten(1)
        c = torch.cat([flat_mu[idx], flat_lv[idx]], dim=1)
        return h[:rows], h[rows:], c

    soft = nn.functional.softplus
    for _ in range(steps):
        hq, hp, c = draw(batch)
        loss = soft(-cond(torch.cat([hq, c], 1))).mean() + soft(cond(torch.cat([hp, c], 1))).mean()
        loss = loss + soft(-marg(hq)).mean() + soft(marg(hp)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hq, _, c = draw(eval_samples)
        kl = float(cond(torch.cat([hq, c], 1)).mean())
        agg = float(marg(hq).mean())
    return kl, agg, kl - agg


Case = tuple[str, Callable[[int], nn.Sequential], bool]
CASES: list[Case] = [
    ("3-layer linear MLP", lambda d: linear_chain(d, 3), False),
    ("8-layer linear MLP", lambda d: linear_chain(d, 8), False),
    ("conv, upsample + two 1x1", lambda d: conv_upsample(d, 8), True),
    ("LeakyReLU MLP (Linear, LeakyReLU, Linear)", lambda d: leaky_mlp(d, 1), False),
    ("3-layer LeakyReLU MLP ((Linear, LeakyReLU) x 2, Linear)", lambda d: leaky_mlp(d, 2), False),
]


def _worst(values: dict[str, Truth], truth: Truth) -> float:
    return max(abs(v - t) for row in values.values() for v, t in zip(row, truth, strict=True))


def compare(
    case: Case, device: torch.device, plain_steps: int, n: int = 1000, d: int = 16
) -> list[str]:
    name, build, is_conv = case
    mu, lv = gaussian_case(d=d, n=n, kl=7.7, sigma=0.5, seed=0)
    if is_conv:
        mu, lv = mu.view(n, *conv_latent_shape(d)), lv.view(n, *conv_latent_shape(d))
    mu, lv = mu.to(device), lv.to(device)
    torch.manual_seed(1)
    dec = build(d).to(device)
    layers = [k for k, m in dec.named_children() if any(True for _ in m.parameters())]

    base = _reset_peak(device)
    t0 = time.perf_counter()
    plain: dict[str, Truth] = {}
    for k in layers:
        prefix = dec[: int(k) + 1]
        plain[k] = per_layer_plain(prefix, mu, lv, plain_steps)
    t_plain = time.perf_counter() - t0
    m_plain = _peak_mib(device, base)

    base = _reset_peak(device)
    t0 = time.perf_counter()
    report = ds.inspect(
        vae_for(mu, lv, dec), index_data(n), layers=layers, random_inits=0, seeds=1, device=device
    )
    t_ds = time.perf_counter() - t0
    m_ds = _peak_mib(device, base)
    exact = report.variant("trained").layer("latent").exact
    assert exact is not None
    truth = (exact.kl, exact.aggregate_kl, exact.mi)
    trained = report.variant("trained")
    ours = {
        k: (trained.layer(k).kl.mean, trained.layer(k).aggregate_kl.mean, trained.layer(k).mi.mean)
        for k in layers
    }
    return [
        name,
        str(len(layers)),
        f"{t_plain:.1f}",
        f"{_worst(plain, truth):.2f}",
        f"{m_plain:.0f}",
        f"{t_ds:.1f} ({report.settings['steps_run']} steps)",
        f"{_worst(ours, truth):.2f}",
        f"{m_ds:.0f}",
        f"{t_plain / t_ds:.1f}x",
    ]


def _per_step_ms(
    dec: nn.Module, mu: torch.Tensor, lv: torch.Tensor, device: torch.device, steps: int
) -> tuple[float, float]:
    """decoderscope's wall time per training step (ms; from two fixed-length runs, so set-up and
    evaluation cancel) and the longer run's total (s). Each run's time is the faster of two:
    with large N the fixed cost dominates, and one slow run made a difference negative."""
    times = []
    for s in (steps, 2 * steps):
        settings = ds.Settings(
            steps=s, patience=0, regression_steps=0, eval_samples=512, pair_samples=256
        )
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            ds.inspect(
                vae_for(mu, lv, dec),
                index_data(mu.shape[0]),
                random_inits=0,
                seeds=1,
                device=device,
                settings=settings,
            )
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return 1000 * (times[1] - times[0]) / steps, times[1]


def scaling(device: torch.device, steps: int) -> list[list[str]]:
    rows = []
    mu, lv = gaussian_case(d=16, n=1000, kl=7.7, sigma=0.5, seed=0)
    for depth in (1, 2, 4, 8):
        torch.manual_seed(1)
        ms = _per_step_ms(
            linear_chain(16, depth).to(device), mu.to(device), lv.to(device), device, steps
        )
        rows.append(["layers", str(depth), f"{ms[0]:.1f}", f"{ms[1]:.1f}"])
    for n in (250, 1000, 4000, 16000):
        m, v = gaussian_case(d=16, n=n, kl=7.7, sigma=0.5, seed=0)
        torch.manual_seed(1)
        ms = _per_step_ms(linear_chain(16, 3).to(device), m.to(device), v.to(device), device, steps)
        rows.append(["data points N", str(n), f"{ms[0]:.1f}", f"{ms[1]:.1f}"])
    for width in (16, 64, 256, 1024):
        torch.manual_seed(1)
        dec = nn.Sequential(nn.Linear(16, width), nn.Linear(width, width)).to(device)
        ms = _per_step_ms(dec, mu.to(device), lv.to(device), device, steps)
        rows.append(["layer width", str(width), f"{ms[0]:.1f}", f"{ms[1]:.1f}"])
    return rows


def _table(header: list[str], rows: list[list[str]], right: int) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] * (len(header) - right) + ["---:"] * right) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the tables (Markdown) here")
    parser.add_argument(
        "--only", action="append", help="run only this case (repeatable), without the scaling"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    plain_steps = 200 if args.quick else 2000
    header = [
        "decoder",
        "layers",
        "per-layer plain: s",
        "max err",
        "peak MiB",
        "decoderscope: s",
        "max err",
        "peak MiB",
        "speed-up",
    ]
    rows = []
    cases = CASES[:1] if args.quick else CASES
    if args.only:
        cases = [c for c in CASES if c[0] in args.only]
        if len(cases) != len(args.only):
            parser.error(f"--only takes case names from: {[c[0] for c in CASES]}")
    for case in cases:
        rows.append(compare(case, device, plain_steps))
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    if args.only:
        return
    scale_steps = 20 if args.quick else 100
    scale = scaling(device, scale_steps)
    for r in scale:
        print(" ".join(r), flush=True)
    text = (
        f"Device: {device}, torch threads: {torch.get_num_threads()}.\n\n"
        + _table(header, rows, 7)
        + f"\n\ndecoderscope's time per training step, and the total for {2 * scale_steps} steps "
        "with evaluation: 3-layer linear chain, d = 16, N = 1000 unless varied, one seed, no "
        "re-initialisations (width: Linear(16, w) then Linear(w, w)):\n\n"
        + _table(["varied", "value", "ms per step", f"s for {2 * scale_steps} steps"], scale, 2)
        + "\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

"""Results as frozen dataclasses with a JSON round trip (schema `decoderscope.report/1`).

All values are in nats. Nothing here prints; renderers live in `render.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .attribution import Attribution
from .bounds import Bounds
from .errors import DecoderscopeError
from .estimate import Estimate
from .latent_stats import LatentStats
from .mmd import Mmd
from .render import markdown

SCHEMA = "decoderscope.report/1"
UNRELIABLE = "unreliable"
# the values of every row, and how messages name them
QUANTITIES = ("kl", "aggregate_kl", "mi")
LABELS = {"kl": "KL", "aggregate_kl": "aggregate KL", "mi": "MI"}


@dataclass(frozen=True)
class Exact:
    """Exact latent values: closed-form KL; MI by exact-density Monte Carlo (`mi_se`)."""

    kl: float
    aggregate_kl: float
    mi: float
    mi_se: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kl": self.kl,
            "aggregate_kl": self.aggregate_kl,
            "mi": self.mi,
            "mi_se": self.mi_se,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Exact:
        return cls(
            float(d["kl"]), float(d["aggregate_kl"]), float(d["mi"]), float(d.get("mi_se", 0.0))
        )


@dataclass(frozen=True)
class LayerResult:
    """One row: a tapped layer (or the latent), its per-sample output shape and the estimates."""

    name: str
    type: str
    shape: tuple[int, ...]
    kl: Estimate
    aggregate_kl: Estimate
    mi: Estimate
    exact: Exact | None = None
    critic_accuracy: float | None = None
    mi_share: float | None = None  # MI / exact latent MI
    # nats the learned inverse R(h) leaves blurred (largest over runs); a bound on how low an
    # injective layer may read, not a correction
    inverse_blur: float | None = None
    # the layer is an affine function of the latent of this rank: its values are exact
    # (closed-form KL, exact-density Monte Carlo MI), not a critic's
    affine_rank: int | None = None
    # values computed from each sample's preimages, not a critic's (a folding layer): distinct
    # preimages found per sample (mean over runs) and the share of samples whose own latent z
    # was among them (lowest over runs)
    preimages: float | None = None
    preimage_coverage: float | None = None
    # read by a critic because R(h) does not invert the layer and a preimage search would take
    # more than `preimage_flops`: that search's projected FLOPs (largest over runs)
    preimage_flops: float | None = None
    # how the values were read (`estimators.runs.WHY`); runs that differ are joined by "+"
    method: str | None = None
    # where values break a hard bound beyond their error bars (`guard.py`): which of kl /
    # aggregate_kl / mi, and why
    unreliable: tuple[str, ...] = ()
    reason: str | None = None
    # with a likelihood, the trained decoder's rows: -distortion - KL of this layer (nats)
    elbo: Estimate | None = None
    # MMD^2 between the aggregate posterior and the prior at this layer (Gaussian kernel)
    mmd2: Mmd | None = None
    # with attribution=True: Shapley values of KL and MI over the latent units
    attribution: Attribution | None = None

    @property
    def status(self) -> str | None:
        """ "unreliable" where the guard marked a value (JSON `status`), else None."""
        return UNRELIABLE if self.unreliable else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "shape": list(self.shape),
            "kl": self.kl.to_dict(),
            "aggregate_kl": self.aggregate_kl.to_dict(),
            "mi": self.mi.to_dict(),
        }
        if self.method is not None:
            d["method"] = self.method
        if self.exact is not None:
            d["exact"] = self.exact.to_dict()
        if self.critic_accuracy is not None:
            d["critic_accuracy"] = self.critic_accuracy
        if self.mi_share is not None:
            d["mi_share"] = self.mi_share
        if self.inverse_blur is not None:
            d["inverse_blur"] = self.inverse_blur
        if self.affine_rank is not None:
            d["affine_rank"] = self.affine_rank
        if self.preimages is not None:
            d["preimages"] = self.preimages
        if self.preimage_coverage is not None:
            d["preimage_coverage"] = self.preimage_coverage
        if self.preimage_flops is not None:
            d["preimage_flops"] = self.preimage_flops
        if self.mmd2 is not None:
            d["mmd2"] = self.mmd2.to_dict()
        if self.attribution is not None:
            d["attribution"] = self.attribution.to_dict()
        if self.elbo is not None:
            d["elbo"] = {k: v for k, v in self.elbo.to_dict().items() if k != "n"}
        if self.status is not None:
            d["status"] = self.status
            d["reason"] = self.reason
            d["unreliable"] = list(self.unreliable)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerResult:
        return cls(
            name=d["name"],
            type=d["type"],
            shape=tuple(int(x) for x in d["shape"]),
            kl=Estimate.from_dict(d["kl"]),
            aggregate_kl=Estimate.from_dict(d["aggregate_kl"]),
            mi=Estimate.from_dict(d["mi"]),
            exact=Exact.from_dict(d["exact"]) if d.get("exact") else None,
            critic_accuracy=d.get("critic_accuracy"),
            mi_share=d.get("mi_share"),
            inverse_blur=d.get("inverse_blur"),
            affine_rank=d.get("affine_rank"),
            preimages=d.get("preimages"),
            preimage_coverage=d.get("preimage_coverage"),
            preimage_flops=d.get("preimage_flops"),
            method=d.get("method"),
            reason=d.get("reason"),
            unreliable=tuple(d.get("unreliable", ())),
            elbo=Estimate.from_dict({**d["elbo"], "n": 1}) if d.get("elbo") else None,
            mmd2=Mmd.from_dict(d["mmd2"]) if d.get("mmd2") else None,
            attribution=Attribution.from_dict(d["attribution"]) if d.get("attribution") else None,
        )


@dataclass(frozen=True)
class VariantResult:
    """All rows of one decoder variant (`trained` or `random`); the first row is `latent`."""

    name: str
    runs: int
    layers: tuple[LayerResult, ...]

    def layer(self, name: str) -> LayerResult:
        for row in self.layers:
            if row.name == name:
                return row
        names = ", ".join(r.name for r in self.layers)
        raise DecoderscopeError(f"no layer {name!r} in variant {self.name!r}; it has: {names}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "runs": self.runs, "layers": [r.to_dict() for r in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantResult:
        return cls(d["name"], int(d["runs"]), tuple(LayerResult.from_dict(r) for r in d["layers"]))


@dataclass(frozen=True)
class Diagnostic:
    """A warning or note about a layer (or the whole run when `layer` is None)."""

    level: str
    message: str
    layer: str | None = None
    variant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"level": self.level, "layer": self.layer, "message": self.message}
        if self.variant is not None:
            d["variant"] = self.variant
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Diagnostic:
        return cls(d["level"], d["message"], d.get("layer"), d.get("variant"))


@dataclass(frozen=True)
class ModelInfo:
    latent_shape: tuple[int, ...]
    n_data: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "latent_shape": list(self.latent_shape),
            "n_data": self.n_data,
            "source": self.source,
        }


@dataclass(frozen=True)
class Report:
    """What `inspect` found. `variant(name).layer(name)` gets a row; values are nats."""

    version: str
    model: ModelInfo
    settings: dict[str, Any]
    variants: tuple[VariantResult, ...]
    diagnostics: tuple[Diagnostic, ...] = field(default_factory=tuple)
    bounds: Bounds | None = None  # with a likelihood: rate, distortion, ELBO, IWAE
    latent_stats: LatentStats | None = None
    schema: str = SCHEMA

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        names = ", ".join(v.name for v in self.variants)
        raise DecoderscopeError(f"no variant {name!r} in this report; it has: {names}")

    def to_dict(self) -> dict[str, Any]:
        d = {
            "schema": self.schema,
            "version": self.version,
            "model": self.model.to_dict(),
            "settings": dict(self.settings),
            "variants": [v.to_dict() for v in self.variants],
            "diagnostics": [d.to_dict() for d in self.diagnostics],
        }
        if self.bounds is not None:
            d["bounds"] = self.bounds.to_dict()
        if self.latent_stats is not None:
            d["latent_stats"] = self.latent_stats.to_dict()
        return d

    def unreliable_rows(self) -> list[tuple[str, LayerResult]]:
        """(variant, row) for every row the guard marked unreliable."""
        return [(v.name, r) for v in self.variants for r in v.layers if r.status is not None]

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        if d.get("schema") != SCHEMA:
            raise DecoderscopeError(
                f"not a decoderscope report: schema is {d.get('schema')!r}, expected {SCHEMA!r}"
            )
        m = d["model"]
        return cls(
            version=d["version"],
            model=ModelInfo(tuple(m["latent_shape"]), int(m["n_data"]), m.get("source", "")),
            settings=dict(d["settings"]),
            variants=tuple(VariantResult.from_dict(v) for v in d["variants"]),
            diagnostics=tuple(Diagnostic.from_dict(x) for x in d.get("diagnostics", [])),
            bounds=Bounds.from_dict(d["bounds"]) if d.get("bounds") else None,
            latent_stats=LatentStats.from_dict(d["latent_stats"])
            if d.get("latent_stats")
            else None,
            schema=d["schema"],
        )

    @classmethod
    def from_json(cls, text: str) -> Report:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DecoderscopeError(f"report is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_markdown(self) -> str:
        return markdown(self)

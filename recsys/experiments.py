"""A/B variants: deterministic bucketing, forced variants, per-variant sources.

Both services read the same ``[experiments]`` config and bucket the same
way, so they agree on a user's variant without talking about it; ranking
also passes the resolved name on to ``Retrieve`` in ``UserContext.variant``.

Bucketing hashes ``(experiment name, user id)`` with BLAKE2b into a number
in ``[0, 1)`` and picks the variant whose slice of the cumulative shares
holds it. The hash is stable across processes, machines and Python versions
(unlike ``hash()``), so a user stays in one variant for as long as the
experiment's name, its variants' order and their shares stay the same: the
slices are laid out in config order, so reordering the variants moves users
(and changes the default variant, the first one). Renaming the experiment
reshuffles everyone, which is how a new experiment gets fresh buckets.
Requests without a user id get the default variant.

With no variants configured there is one implicit variant, ``default``,
that serves the current model version and the configured sources, and
:meth:`Experiment.resolve` does no hashing at all.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram

from recsys.config import CURRENT_VERSION, ConfigError, ExperimentSettings, SourceOverride
from recsys.errors import shown

DEFAULT_VARIANT = "default"
_SCALE = float(1 << 53)

VARIANT_REQUESTS = Counter(
    "recsys_variant_requests_total",
    "Requests served, by experiment variant.",
    ["service", "method", "variant"],
)
VARIANT_LATENCY = Histogram(
    "recsys_variant_latency_seconds",
    "Server-side handling time by experiment variant.",
    ["service", "method", "variant"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


class UnknownVariant(ValueError):
    """A request forced a variant the experiment does not define (INVALID_ARGUMENT)."""

    def __init__(self, name: str, known: Sequence[str], field_name: str = "user.variant"):
        super().__init__(
            f"{field_name}: unknown variant {shown(name)}; configured: {', '.join(known)}"
        )
        self.field = field_name
        self.name = name


@dataclass(frozen=True)
class Variant:
    """One variant as the services use it.

    Attributes:
        name: Label on responses and metrics.
        share: Fraction of users bucketed into it.
        model_version: ``"current"`` (follow the served version) or a pinned version.
        sources: Overrides of ``retrieval.sources`` entries, by source name.
    """

    name: str
    share: float = 1.0
    model_version: str = CURRENT_VERSION
    sources: Mapping[str, SourceOverride] = field(default_factory=dict)

    @property
    def pinned_version(self) -> str | None:
        """The pinned model version, or None when the variant follows the current one."""
        return None if self.model_version == CURRENT_VERSION else self.model_version


def bucket(experiment: str, user_id: str) -> float:
    """Where a user falls in ``[0, 1)`` for an experiment (stable across processes)."""
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    digest = hashlib.blake2b(
        experiment.encode() + b"\x00" + user_id.encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    # The top 53 bits: exactly representable, so the result stays below 1.0
    # (64 bits divided by 2**64 rounds up to 1.0 for the highest digests).
    return (int.from_bytes(digest, "big") >> 11) / _SCALE


class Experiment:
    """The configured variants and the rule that assigns users to them.

    Args:
        settings: The ``[experiments]`` section; no variants means variant ``default`` only.
    """

    def __init__(self, settings: ExperimentSettings | None = None):
        settings = settings or ExperimentSettings()
        self.name = settings.name
        if settings.variants:
            self.variants = [
                Variant(v.name, v.share, v.model_version, dict(v.sources))
                for v in settings.variants
            ]
        else:
            self.variants = [Variant(DEFAULT_VARIANT)]
        self.active = bool(settings.variants)
        self.by_name = {v.name: v for v in self.variants}
        self.default = self.variants[0]
        bounds, total = [], 0.0
        for v in self.variants:
            total += v.share
            bounds.append(total)
        # Shares may sum to 1 within rounding: the rounding slack goes to the
        # last variant with a share, so trailing zero-share (force-only)
        # variants keep empty slices.
        last = max((i for i, v in enumerate(self.variants) if v.share > 0), default=0)
        for i in range(last, len(bounds)):
            bounds[i] = 1.0
        self._bounds = bounds

    @property
    def names(self) -> list[str]:
        """Variant names in config order."""
        return [v.name for v in self.variants]

    def assign(self, user_id: str) -> Variant:
        """The variant a user is bucketed into; a request without a user gets the default one.

        An empty id would hash to one fixed bucket, sending every anonymous
        ``Rank`` to whichever arm that bucket falls in (depending on the
        experiment's name), whatever the shares.
        """
        if not self.active or not user_id:
            return self.default
        i = bisect.bisect_right(self._bounds, bucket(self.name, user_id))
        # A zero-share variant has an empty slice; min() guards a rounding edge.
        return self.variants[min(i, len(self.variants) - 1)]

    def resolve(self, user_id: str, forced: str = "", field_name: str = "user.variant") -> Variant:
        """The variant for a request: the forced one when given, else the user's bucket.

        Raises:
            UnknownVariant: ``forced`` names no configured variant.
        """
        if forced:
            v = self.by_name.get(forced)
            if v is None:
                raise UnknownVariant(forced, self.names, field_name)
            return v
        return self.assign(user_id)

    def model_tracks(self) -> dict[str, list[str]]:
        """Model version key (``"current"`` or a pinned version) -> the variants using it."""
        tracks: dict[str, list[str]] = {}
        for v in self.variants:
            tracks.setdefault(v.model_version, []).append(v.name)
        return tracks


def source_entries(
    entries: Sequence[Mapping[str, Any]], variant: Variant, *, where: str = ""
) -> list[dict[str, Any]]:
    """``retrieval.sources`` with a variant's overrides applied (config order kept).

    Args:
        entries: The base ``retrieval.sources`` list.
        variant: The variant whose overrides apply.
        where: Config location of the variant, for error messages.

    Raises:
        ConfigError: An override names a source that is not configured, or
            the variant disables every source.
    """
    where = where or f"experiments.variants[name={variant.name!r}]"
    names = [str(e.get("name")) for e in entries]
    for name in variant.sources:
        if name not in names:
            raise ConfigError(
                f"{where}.sources.{name}: no retrieval source named {name!r}; "
                f"configured: {', '.join(names)}"
            )
    out: list[dict[str, Any]] = []
    for entry in entries:
        override = variant.sources.get(str(entry.get("name")))
        if override is None:
            out.append(dict(entry))
            continue
        if not override.enabled:
            continue
        changes = override.model_dump(exclude={"enabled"}, exclude_none=True)
        out.append({**entry, **changes})
    if not out:
        raise ConfigError(f"{where}.sources: the variant disables every retrieval source")
    return out


@functools.cache
def _variant_children(service: str, method: str, variant: str) -> tuple[Any, Any]:
    # Label lookups are slow enough to matter per request; the set is bounded by config.
    return (
        VARIANT_REQUESTS.labels(service, method, variant),
        VARIANT_LATENCY.labels(service, method, variant),
    )


def observe_request(service: str, method: str, variant: str, seconds: float) -> None:
    """Counts one served request and its handling time under its variant label."""
    requests, latency = _variant_children(service, method, variant)
    requests.inc()
    latency.observe(seconds)

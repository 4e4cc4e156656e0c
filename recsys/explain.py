"""Reasons ("why recommended") derived from the retrieval sources of an item.

One pure function, :func:`explain`, turns a candidate's provenance (which
sources proposed it, the seed item of a similarity source, the genre of a
per-genre list) into reasons, each with a machine-readable ``kind``, the
``ref`` it points at and a human ``text``:

==================  ===================  ====================================
kind                ref                  text
==================  ===================  ====================================
``similar_to``      seed item id         Because you watched *<seed title>*
``top_in_genre``    genre name           Top in <Genre>
``top_in_country``  user's country       Popular in your region
``popular``         (empty)              Popular now
==================  ===================  ====================================

Which kind a source gives comes from its *type* in ``retrieval.sources``
(:func:`source_kinds`), not from its name, so a renamed source explains
itself the same way; the candidate's own fields (a seed item, a genre)
settle it for source types outside the built-ins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

SIMILAR_TO = "similar_to"
TOP_IN_GENRE = "top_in_genre"
TOP_IN_COUNTRY = "top_in_country"
POPULAR = "popular"

# Most specific first: the first reason is the one a short UI shows.
_ORDER = {SIMILAR_TO: 0, TOP_IN_GENRE: 1, TOP_IN_COUNTRY: 2, POPULAR: 3}

# Built-in source types -> reason kind.
TYPE_KINDS: Mapping[str, str] = {
    "annoy_similar": SIMILAR_TO,
    "redis_top_genre": TOP_IN_GENRE,
    "redis_top_country": TOP_IN_COUNTRY,
    "popular": POPULAR,
}


@dataclass(frozen=True)
class Reason:
    """Why an item is recommended (mirrors ``recsys.v1.Reason``)."""

    kind: str
    ref: str
    text: str


class Provenance(Protocol):
    """What :func:`explain` reads from a candidate (``recsys.v1.Candidate`` fits)."""

    @property
    def sources(self) -> Sequence[str]: ...

    @property
    def seed_item_id(self) -> str: ...

    @property
    def genre(self) -> str: ...


def source_kinds(entries: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Source name -> reason kind, from ``retrieval.sources`` entries of built-in types."""
    out: dict[str, str] = {}
    for e in entries:
        kind = TYPE_KINDS.get(str(e.get("type", "")))
        if kind is not None and e.get("name"):
            out[str(e["name"])] = kind
    # The ranking service's own popular-list fallback labels items "popular".
    out.setdefault("popular", POPULAR)
    return out


def explain(
    candidate: Provenance,
    *,
    kinds: Mapping[str, str],
    title_of: Callable[[str], str],
    country: str = "",
) -> list[Reason]:
    """The reasons for one recommended item, most specific first, one per kind.

    Args:
        candidate: The item's provenance: source names, seed item, genre.
        kinds: Source name -> reason kind (:func:`source_kinds`).
        title_of: Display title of an item id (empty when unknown; the id is shown then).
        country: The user's country, the ``ref`` of a regional reason.

    Returns:
        Reasons without repeats of a kind; empty when no source explains the item.
    """
    seed = candidate.seed_item_id or ""
    genre = candidate.genre or ""
    found: dict[str, Reason] = {}
    for source in candidate.sources:
        kind = kinds.get(source)
        if kind is None:  # a plugin source: its own fields may still say what it is
            kind = SIMILAR_TO if seed else TOP_IN_GENRE if genre else None
        if kind is None or kind in found:
            continue
        if kind == SIMILAR_TO:
            if not seed:
                continue
            found[kind] = Reason(kind, seed, f"Because you watched {title_of(seed) or seed}")
        elif kind == TOP_IN_GENRE:
            if not genre:
                continue
            found[kind] = Reason(kind, genre, f"Top in {genre}")
        elif kind == TOP_IN_COUNTRY:
            found[kind] = Reason(kind, country, "Popular in your region")
        elif kind == POPULAR:
            found[kind] = Reason(kind, "", "Popular now")
    return sorted(found.values(), key=lambda r: _ORDER[r.kind])

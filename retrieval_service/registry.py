"""Finds candidate sources through entry points and builds them from config.

Built-in and third-party sources are loaded the same way: every class is
registered under the entry-point group :data:`ENTRY_POINT_GROUP`, and a
``retrieval.sources`` entry names one by ``type``. Each entry is validated
against that class's ``config_model`` at startup, so a typo fails the start
with a message naming the source and the key, not the first request.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError

from recsys.errors import describe_error
from retrieval_service.errors import SourceConfigError
from retrieval_service.sources.base import CandidateSource, SourceConfig

ENTRY_POINT_GROUP = "recsys.candidate_sources"
MAX_SOURCES = 64


def _entry_points() -> list[EntryPoint]:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def available_sources() -> dict[str, EntryPoint]:
    """Installed source types: entry-point name to entry point (see :func:`type_clashes`)."""
    return {ep.name: ep for ep in _entry_points()}


def type_clashes() -> dict[str, list[EntryPoint]]:
    """Source types that installed packages define more than once, differently.

    Which definition :func:`available_sources` keeps depends on the order of
    ``sys.path``: a plugin naming its type ``popular`` would silently replace
    the built-in.
    """
    seen: dict[str, list[EntryPoint]] = {}
    for ep in _entry_points():
        same = seen.setdefault(ep.name, [])
        if all(other.value != ep.value for other in same):
            same.append(ep)
    return {name: eps for name, eps in seen.items() if len(eps) > 1}


def _origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{ep.value} (from {dist.name})" if dist is not None else ep.value


def load_source_class(ep: EntryPoint) -> type:
    """Imports one source class and checks it has the shape the framework needs."""
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must not hide behind a generic error
        raise SourceConfigError(
            f"source type {ep.name!r} ({ep.value}) failed to import: {exc}"
        ) from exc
    model = getattr(cls, "config_model", None)
    if not (isinstance(model, type) and issubclass(model, SourceConfig)):
        raise SourceConfigError(
            f"source type {ep.name!r} ({ep.value}) has no config_model subclassing SourceConfig"
        )
    if not inspect.iscoroutinefunction(getattr(cls, "retrieve", None)):
        raise SourceConfigError(
            f"source type {ep.name!r} ({ep.value}) needs an 'async def retrieve(ctx, k)'"
        )
    return cls


def _describe(where: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<entry>"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}")
        else:
            problems.append(f"{key}: {err['msg']}")
    return f"{where}: " + "; ".join(problems)


def build_sources(
    entries: Sequence[Mapping[str, Any]],
    *,
    available: Mapping[str, EntryPoint] | None = None,
) -> list[CandidateSource]:
    """Validates ``retrieval.sources`` and instantiates every source, in config order.

    Args:
        entries: The config list, each ``{name, type, budget, weight, timeout_ms, ...}``.
        available: Entry points to use (default: everything installed).

    Raises:
        SourceConfigError: Unknown type, a type two packages define, unknown
            or invalid key, duplicate name, or no source at all; the message
            names the source and key.
    """
    found = available_sources() if available is None else dict(available)
    clashes = type_clashes() if available is None else {}
    sources: list[CandidateSource] = []
    names: set[str] = set()
    if not entries:
        raise SourceConfigError("retrieval.sources is empty: configure at least one source")
    if len(entries) > MAX_SOURCES:
        # A candidate's sources travel as one bit each of a uint64 (PackedCandidates).
        raise SourceConfigError(
            f"retrieval.sources: {len(entries)} sources configured, at most {MAX_SOURCES}"
        )
    for i, entry in enumerate(entries):
        where = f"retrieval.sources[{i}]"
        if not isinstance(entry, Mapping):
            raise SourceConfigError(f"{where}: expected a table, got {type(entry).__name__}")
        if "name" in entry:
            where += f" (name={entry['name']!r})"
        kind = entry.get("type")
        if not kind:
            raise SourceConfigError(f"{where}: missing key 'type'")
        if not isinstance(kind, str):
            raise SourceConfigError(
                f"{where}: key 'type' must be a string, got {type(kind).__name__}"
            )
        if kind not in found:
            raise SourceConfigError(
                f"{where}: unknown source type {kind!r}; installed types under "
                f"'{ENTRY_POINT_GROUP}': {', '.join(sorted(found)) or 'none'}"
            )
        if kind in clashes:
            raise SourceConfigError(
                f"{where}: source type {kind!r} is defined more than once under "
                f"'{ENTRY_POINT_GROUP}': {', '.join(_origin(ep) for ep in clashes[kind])}; "
                "uninstall one, or give the plugin's entry point another name"
            )
        cls = load_source_class(found[kind])
        try:
            config = cls.config_model.model_validate(dict(entry))
        except ValidationError as exc:
            raise SourceConfigError(_describe(where, exc)) from exc
        if config.name in names:
            raise SourceConfigError(f"{where}: duplicate source name {config.name!r}")
        names.add(config.name)
        try:
            source = cls(config)
        except Exception as exc:  # a plugin's own check of its settings, say
            raise SourceConfigError(
                f"{where}: source type {kind!r} could not be built: {describe_error(exc)}"
            ) from exc
        if not isinstance(source, CandidateSource):
            raise SourceConfigError(f"{where}: {cls.__name__} lacks 'name' or 'config'")
        sources.append(source)
    return sources

"""Client of ``RetrievalService.Retrieve`` used by ``Recommend``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from recsys.channels import create_channel
from recsys.config import RankingSettings
from recsys.packed import Catalogue, candidates_of
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc

# Share of the client's remaining deadline kept back from the retrieval call.
DEADLINE_RESERVE = 0.2


class RetrievalUnavailable(Exception):
    """Retrieval could not answer; ``reason`` is safe to show a client."""

    def __init__(self, reason: str, code: str):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class RetrievalRejected(Exception):
    """Retrieval refused the request itself (INVALID_ARGUMENT): the caller's fault."""


@dataclass
class RetrievalAnswer:
    """Candidates with provenance and per-source reports.

    Attributes:
        candidates: Supports ``len()`` and ``candidates[p]``, which gives an
            object with ``item_id``, ``sources``, ``score``, ``source_scores``,
            ``seed_item_id`` and ``genre`` (``recsys.packed.PackedCandidate``,
            decoded on access, or ``recsys.v1.Candidate`` from an older server).
        item_ids: Candidate ids in retrieval order (no per-candidate decoding);
            empty when the answer came by rows.
        rows: The candidates' rows in the caller's catalogue when retrieval
            shares it and answered by rows (then no ids were sent), else None.
        reports: ``recsys.v1.SourceReport`` per source.
        index_version: Version that produced the answer.
    """

    candidates: Sequence[Any]
    reports: Sequence[Any]
    index_version: str
    item_ids: Sequence[str] = ()
    rows: np.ndarray | None = None


class RetrievalClient:
    """One long-lived ``grpc.aio`` channel to the retrieval service."""

    def __init__(self, settings: RankingSettings):
        self.address = settings.retrieval_address
        self.timeout_s = settings.retrieval_timeout_s
        # One retry of UNAVAILABLE (a dropped connection) is worth it; more would
        # only spend the deadline that the popular-list fallback needs.
        self.channel = create_channel(
            self.address,
            aio=True,
            tls=settings.retrieval_tls,
            max_message_bytes=settings.max_message_bytes,
            max_attempts=2,
        )
        token = settings.retrieval_auth_token
        self.metadata = (
            (("authorization", f"Bearer {token.get_secret_value()}"),) if token else None
        )
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(self.channel)

    async def retrieve(
        self,
        user: Any,
        budget: int,
        sources: Sequence[str],
        time_remaining: float | None,
        *,
        source_scores: bool = True,
        trace_metadata: Sequence[tuple[str, str]] = (),
        catalogue: Catalogue | None = None,
    ) -> RetrievalAnswer:
        """Calls Retrieve with the caller's deadline propagated.

        The deadline is ``min(retrieval_timeout_s, 80% of the time the caller
        has left)``; the rest is kept to rank the popular list if retrieval
        does not answer. The answer comes packed (parallel arrays, see
        :mod:`recsys.packed`). ``source_scores=False`` asks retrieval to leave
        the per-source scores out (only debug output shows them).
        ``trace_metadata`` (a W3C ``traceparent``) goes out with the call.
        With ``catalogue`` (the caller's model version), retrieval names the
        candidates by row when it serves the same catalogue.

        Raises:
            RetrievalUnavailable: Down, timed out, overloaded or failing.
            RetrievalRejected: Retrieval found the request invalid.
        """
        timeout = self.timeout_s
        if time_remaining is not None:
            # Keep a share of the caller's deadline to rank the fallback list
            # if retrieval does not answer in time.
            timeout = max(min(timeout, time_remaining * (1.0 - DEADLINE_RESERVE)), 0.001)
        request = retrieval_pb2.RetrieveRequest(
            user=user,
            budget=budget,
            sources=list(sources),
            omit_source_scores=not source_scores,
            packed=True,
            catalogue=catalogue.catalogue_id if catalogue is not None else "",
        )
        try:
            metadata = self.metadata
            if trace_metadata:
                metadata = (*(metadata or ()), *trace_metadata)
            resp = await self.stub.Retrieve(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise RetrievalRejected(exc.details() or "invalid request") from exc
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = f"retrieval did not answer within {timeout * 1000:.0f} ms"
            else:
                reason = f"retrieval unavailable ({code.name})"
            raise RetrievalUnavailable(reason, code.name) from exc
        try:
            candidates, item_ids, rows = candidates_of(resp, catalogue)
        except ValueError as exc:  # a malformed packed answer: treat as retrieval failing
            raise RetrievalUnavailable("retrieval sent a malformed answer", "INTERNAL") from exc
        return RetrievalAnswer(
            candidates=candidates,
            reports=resp.source_reports,
            index_version=resp.index_version,
            item_ids=item_ids or (),
            rows=rows,
        )

    async def close(self) -> None:
        """Closes the channel."""
        await self.channel.close()

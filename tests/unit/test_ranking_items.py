"""RankingServicer._items: items built from cached encodings equal items built field by field."""

from __future__ import annotations

import math

import pytest

from ranking_service.core import RankedItem, Ranker, RankOutcome
from ranking_service.servicer import RankingServicer
from recsys.config import RankingSettings
from recsys.explain import source_kinds
from recsys.v1 import common_pb2, ranking_pb2

TITLES = ["Alpha (1990)", "Beta (1991)", "Gamma (1992)"]
GENRES = [["Drama"], ["Comedy", "Drama"], []]


class _Model:
    """The catalogue lookups _items and _explain use (a LoadedModel has the same)."""

    name = "7"

    def title(self, row: int) -> str:
        return TITLES[row]

    def genres(self, row: int) -> list[str]:
        return GENRES[row]

    def title_of(self, item_id: str) -> str:
        return TITLES[int(item_id[1:])] if item_id[1:].isdigit() else ""


def _outcome(model: _Model, scores: list[float]) -> RankOutcome:
    cands = [
        common_pb2.Candidate(item_id="i0", sources=["similar"], seed_item_id="i2"),
        common_pb2.Candidate(item_id="i1", sources=["genre", "popular"], genre="Comedy"),
        None,  # an item without provenance (as in Rank)
    ]
    items = [
        RankedItem(row, f"i{row}", score, score, candidate=c)
        for row, (score, c) in enumerate(zip(scores, cands, strict=True))
    ]
    return RankOutcome(model, items, country="NL")  # type: ignore[arg-type]


def _expected(out: RankOutcome) -> list[ranking_pb2.ScoredItem]:
    want = []
    for it in out.items:
        msg = ranking_pb2.ScoredItem(
            item_id=it.item_id,
            score=it.score,
            title=TITLES[it.row],
            genres=GENRES[it.row],
            sources=list(it.candidate.sources) if it.candidate else [],
        )
        for r in it.reasons:
            msg.reasons.add(kind=r.kind, ref=r.ref, text=r.text)
        want.append(msg)
    return want


@pytest.mark.parametrize(
    "scores",
    [
        [4.25, 3.0, 0.0],
        [0.1, float("nan"), -2.5],
        [1e39, float("inf"), 0.5],  # past float32: protobuf's own rounding (to inf)
    ],
)
def test_cached_encodings_build_the_same_items(scores):
    ranker = Ranker(kinds=source_kinds(()))
    servicer = RankingServicer(ranker, RankingSettings())
    model = _Model()
    for attempt in range(2):  # the second answer comes from the caches
        out = _outcome(model, scores)
        ranker._explain(out)
        resp = ranking_pb2.RecommendResponse()
        servicer._items(out, False, resp.items)
        got = ranking_pb2.RecommendResponse.FromString(resp.SerializeToString()).items
        want = _expected(out)
        assert len(got) == len(want) == 3, attempt
        for g, w in zip(got, want, strict=True):
            if math.isnan(w.score):
                assert math.isnan(g.score)
                g.score = w.score = 0.0
            assert g == w, attempt
    similar, genre, plain = got
    assert similar.reasons[0].text == "Because you watched Gamma (1992)"
    assert [r.kind for r in genre.reasons] == ["top_in_genre", "popular"]
    assert list(plain.sources) == [] and list(plain.reasons) == []


def test_debug_items_carry_the_debug_fields():
    ranker = Ranker(kinds=source_kinds(()))
    servicer = RankingServicer(ranker, RankingSettings())
    out = _outcome(_Model(), [4.0, 3.0, 2.0])
    ranker._explain(out)
    resp = ranking_pb2.RecommendResponse()
    servicer._items(out, True, resp.items)
    first = resp.items[0]
    assert first.title == TITLES[0] and first.score == 4.0
    assert first.debug.model_version == "7" and list(first.debug.sources) == ["similar"]
    assert first.reasons[0].ref == "i2"

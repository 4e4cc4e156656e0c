"""Hostile input: every RPC of both services against random and malicious messages.

Real servers (this process's event loop, port 0) over a real trained and
published version. Each call must end in a gRPC status from the RPC's
allowed set with a message naming the field, never UNKNOWN/INTERNAL, and
both servers must still answer health checks afterwards (no crash, no hang).
"""

from __future__ import annotations

import re
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.artifacts import ModelVersion
from recsys.v1 import common_pb2, ranking_pb2, retrieval_pb2

from .conftest import BIG_CHANNEL, RANKING, RETRIEVAL, health_status

pytestmark = pytest.mark.asyncio(loop_scope="session")

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
# What each RPC may answer to anything a client can send.
ALLOWED = {
    "Retrieve": {OK, INVALID},
    "SimilarItems": {OK, INVALID, NOT_FOUND},
    "RecordInteraction": {OK, INVALID, NOT_FOUND},
    "Rank": {OK, INVALID},
    "Recommend": {OK, INVALID},
}
SERVICE_OF = {
    "Retrieve": RETRIEVAL,
    "SimilarItems": RETRIEVAL,
    "RecordInteraction": RETRIEVAL,
    "Rank": RANKING,
    "Recommend": RANKING,
}
REQUEST_OF = {
    "Retrieve": retrieval_pb2.RetrieveRequest,
    "SimilarItems": retrieval_pb2.SimilarItemsRequest,
    "RecordInteraction": retrieval_pb2.RecordInteractionRequest,
    "Rank": ranking_pb2.RankRequest,
    "Recommend": ranking_pb2.RecommendRequest,
}
# A refusal names the field first ("budget: ...", "user.recent_item_ids[3]: ...",
# "sources[0]: ...") or says the bytes did not parse.
FIELD_MESSAGE = re.compile(r"^[a-z_]+(\.[a-z_]+)*(\[[^\]]*\])?(\.[a-z_]+)*: \S")
NOT_FOUND_MESSAGE = re.compile(r"^item_id .+ is not in catalogue version ")
INT32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 5, 2**31 - 1, -(2**31)])
)


@pytest.fixture(scope="module")
def catalogue(rel_published) -> tuple[list[str], list[str]]:
    mv = ModelVersion.open(rel_published)
    return list(mv.item_ids), list(mv.users["user_id"])


async def call(target: str, rpc: str, payload: bytes, timeout: float = 20.0):
    """Sends raw request bytes; returns (code, details) and how long it took."""
    service = SERVICE_OF[rpc]
    async with grpc.aio.insecure_channel(target, options=BIG_CHANNEL) as ch:
        stub = ch.unary_unary(f"/{service}/{rpc}")
        t0 = time.monotonic()
        try:
            await stub(payload, timeout=timeout)
            code, details = OK, ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
    return code, details, time.monotonic() - t0


def target_of(services, rpc: str) -> str:
    return services.retrieval if SERVICE_OF[rpc] == RETRIEVAL else services.ranking


async def assert_both_healthy(services) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_status(services.retrieval, RETRIEVAL) == serving
    assert await health_status(services.ranking, RANKING) == serving


def check_answer(rpc: str, code, details: str) -> None:
    assert code in ALLOWED[rpc], f"{rpc} answered {code.name}: {details}"
    if code == INVALID:
        assert FIELD_MESSAGE.match(details) or details.startswith("malformed request: "), details
    if code == NOT_FOUND:
        assert NOT_FOUND_MESSAGE.match(details), details


# --- strategies ------------------------------------------------------------------------

NASTY = st.sampled_from(
    ["", " ", "\x00", "a\x00b", "é" * 100, "💥" * 70, "x" * 257, "../../etc/passwd", "%s%n", "*"]
)


def ids(known: list[str]):
    """Known ids, unknown ids and nasty strings, mixed."""
    return st.one_of(st.sampled_from(known), st.text(max_size=40), NASTY)


def user_ctx(items: list[str], users: list[str]):
    features = st.builds(
        common_pb2.UserFeatures,
        age=st.one_of(st.none(), INT32),
        gender=st.one_of(st.just(""), st.sampled_from(["M", "F"]), st.text(max_size=8)),
        occupation=st.text(max_size=12),
        country=st.one_of(st.just(""), st.text(max_size=12)),
        genre_ratings=st.dictionaries(
            st.text(max_size=10), st.floats(allow_nan=True, allow_infinity=True), max_size=4
        ),
    )
    return st.builds(
        common_pb2.UserContext,
        user_id=ids(users),
        features=features,
        recent_item_ids=st.lists(ids(items), max_size=8),
        exclude_item_ids=st.lists(ids(items), max_size=8),
    )


SOURCES = st.lists(
    st.one_of(
        st.sampled_from(["similar_to_recent", "top_genre", "top_country", "popular"]),
        st.text(max_size=10),
    ),
    max_size=5,
)


def requests(rpc: str, items: list[str], users: list[str]):
    if rpc == "Retrieve":
        return st.builds(
            retrieval_pb2.RetrieveRequest,
            user=user_ctx(items, users),
            budget=INT32,
            sources=SOURCES,
        )
    if rpc == "SimilarItems":
        return st.builds(
            retrieval_pb2.SimilarItemsRequest,
            item_id=ids(items),
            k=INT32,
            user_id=st.one_of(st.just(""), ids(users)),
            variant=st.sampled_from(["", "default", "nope"]),
        )
    if rpc == "RecordInteraction":
        return st.builds(
            retrieval_pb2.RecordInteractionRequest,
            user_id=ids(users),
            item_id=ids(items),
            rating=st.one_of(st.none(), st.floats(width=32)),
            timestamp=st.integers(-(2**63), 2**63 - 1),
        )
    if rpc == "Rank":
        return st.builds(
            ranking_pb2.RankRequest,
            user=user_ctx(items, users),
            candidate_item_ids=st.lists(ids(items), max_size=60),
            top_k=INT32,
            include_watched=st.booleans(),
            debug=st.booleans(),
        )
    return st.builds(
        ranking_pb2.RecommendRequest,
        user=user_ctx(items, users),
        k=INT32,
        retrieval_budget=INT32,
        sources=SOURCES,
        debug=st.booleans(),
    )


# --- property-based --------------------------------------------------------------------


# pytest-asyncio runs each Hypothesis example of an async test in the session loop.
@pytest.mark.parametrize("rpc", list(REQUEST_OF))
@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
async def test_random_messages_get_a_clear_status(services, catalogue, rpc, data):
    items, users = catalogue
    req = data.draw(requests(rpc, items, users))
    code, details, took = await call(target_of(services, rpc), rpc, req.SerializeToString())
    check_answer(rpc, code, details)
    assert took < 10.0, f"{rpc} took {took:.1f} s"
    await assert_both_healthy(services)


@pytest.mark.parametrize("rpc", list(REQUEST_OF))
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.binary(min_size=1, max_size=200))
async def test_random_bytes_are_invalid_argument_not_unknown(services, rpc, payload):
    code, details, _ = await call(target_of(services, rpc), rpc, payload)
    # Random bytes sometimes parse (unknown fields are skipped); then it is a request.
    check_answer(rpc, code, details)
    await assert_both_healthy(services)


# --- hand-picked hostile messages --------------------------------------------------------

PLACEHOLDER = "Q" * 12
BAD_UTF8 = b"\xff\xfe\xc3(\xa0\xa1\xed\xa0\x80zzz"  # same length as PLACEHOLDER
assert len(BAD_UTF8) == len(PLACEHOLDER)


def non_utf8_cases(item: str, user: str) -> list[tuple[str, str, object]]:
    """(rpc, field, request with PLACEHOLDER where the raw bytes go)."""
    ctx = common_pb2.UserContext
    return [
        ("Retrieve", "user.user_id", retrieval_pb2.RetrieveRequest(user=ctx(user_id=PLACEHOLDER))),
        (
            "Retrieve",
            "user.recent_item_ids",
            retrieval_pb2.RetrieveRequest(user=ctx(user_id=user, recent_item_ids=[PLACEHOLDER])),
        ),
        (
            "Retrieve",
            "sources",
            retrieval_pb2.RetrieveRequest(user=ctx(user_id=user), sources=[PLACEHOLDER]),
        ),
        ("SimilarItems", "item_id", retrieval_pb2.SimilarItemsRequest(item_id=PLACEHOLDER, k=3)),
        (
            "RecordInteraction",
            "user_id",
            retrieval_pb2.RecordInteractionRequest(user_id=PLACEHOLDER, item_id=item),
        ),
        (
            "RecordInteraction",
            "item_id",
            retrieval_pb2.RecordInteractionRequest(user_id=user, item_id=PLACEHOLDER),
        ),
        (
            "Rank",
            "candidate_item_ids",
            ranking_pb2.RankRequest(user=ctx(user_id=user), candidate_item_ids=[item, PLACEHOLDER]),
        ),
        (
            "Rank",
            "user.features.genre_ratings",
            ranking_pb2.RankRequest(
                user=ctx(user_id=user, features={"genre_ratings": {PLACEHOLDER: 4.0}}),
                candidate_item_ids=[item],
            ),
        ),
        ("Recommend", "user.user_id", ranking_pb2.RecommendRequest(user=ctx(user_id=PLACEHOLDER))),
        (
            "Recommend",
            "user.features.country",
            ranking_pb2.RecommendRequest(user=ctx(user_id=user, features={"country": PLACEHOLDER})),
        ),
    ]


async def test_non_utf8_strings_are_invalid_argument(services, catalogue):
    items, users = catalogue
    for rpc, field, req in non_utf8_cases(items[0], users[0]):
        raw = req.SerializeToString()
        assert raw.count(PLACEHOLDER.encode()) == 1, field
        code, details, _ = await call(
            target_of(services, rpc), rpc, raw.replace(PLACEHOLDER.encode(), BAD_UTF8)
        )
        assert code == INVALID, f"{rpc}.{field}: {code.name} {details}"
        assert "bad UTF-8" in details and REQUEST_OF[rpc].DESCRIPTOR.full_name in details
    await assert_both_healthy(services)


def hostile_cases(items: list[str], users: list[str]) -> list[tuple[str, object, set, str]]:
    """(rpc, request, allowed codes, text the message must contain)."""
    ctx = common_pb2.UserContext
    u, i = users[0], items[0]
    million = [items[n % len(items)] for n in range(1_000_000)]
    mb_id = "i" * 1_000_000
    big = 2**31 - 1
    return [
        # empty messages
        ("Retrieve", retrieval_pb2.RetrieveRequest(), {INVALID}, "user.user_id"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(), {INVALID}, "item_id"),
        ("RecordInteraction", retrieval_pb2.RecordInteractionRequest(), {INVALID}, "user_id"),
        ("Rank", ranking_pb2.RankRequest(), {INVALID}, "candidate_item_ids"),
        ("Recommend", ranking_pb2.RecommendRequest(), {INVALID}, "user.user_id"),
        # side features: bounded and checked by both services alike
        ("Recommend",
         ranking_pb2.RecommendRequest(user=ctx(user_id=u, features={"country": mb_id})),
         {INVALID}, "user.features.country"),
        ("Retrieve",
         retrieval_pb2.RetrieveRequest(user=ctx(user_id=u, features={"occupation": mb_id})),
         {INVALID}, "user.features.occupation"),
        ("Retrieve", retrieval_pb2.RetrieveRequest(user=ctx(user_id=u, features={"age": -3})),
         {INVALID}, "user.features.age"),
        # 10^6 candidate ids, 1 MB ids
        ("Rank", ranking_pb2.RankRequest(user=ctx(user_id=u), candidate_item_ids=million),
         {INVALID}, "1000000 candidates"),
        ("Rank", ranking_pb2.RankRequest(user=ctx(user_id=u), candidate_item_ids=[i, mb_id]),
         {INVALID}, "candidate_item_ids[1]"),
        ("Retrieve", retrieval_pb2.RetrieveRequest(user=ctx(user_id=mb_id)), {INVALID},
         "user.user_id"),
        ("Retrieve", retrieval_pb2.RetrieveRequest(user=ctx(user_id=u, exclude_item_ids=million)),
         {INVALID}, "user.exclude_item_ids"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id=mb_id, k=5), {INVALID},
         "item_id"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id=i, k=5, user_id=mb_id),
         {INVALID}, "user_id"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id=i, k=5, variant="nope"),
         {INVALID}, "variant"),
        ("RecordInteraction", retrieval_pb2.RecordInteractionRequest(user_id=mb_id, item_id=i),
         {INVALID}, "user_id"),
        ("Recommend", ranking_pb2.RecommendRequest(user=ctx(user_id=u, recent_item_ids=[mb_id])),
         {INVALID}, "user.recent_item_ids[0]"),
        # negative and enormous k / budget / top_k
        ("Retrieve", retrieval_pb2.RetrieveRequest(user=ctx(user_id=u), budget=-1), {INVALID},
         "budget"),
        ("Retrieve", retrieval_pb2.RetrieveRequest(user=ctx(user_id=u), budget=big), {INVALID},
         "budget"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id=i, k=-5), {INVALID}, "k"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id=i, k=big), {INVALID}, "k"),
        ("Rank", ranking_pb2.RankRequest(user=ctx(user_id=u), candidate_item_ids=[i], top_k=-1),
         {INVALID}, "top_k"),
        ("Rank", ranking_pb2.RankRequest(user=ctx(user_id=u), candidate_item_ids=[i], top_k=big),
         {INVALID}, "top_k"),
        ("Recommend", ranking_pb2.RecommendRequest(user=ctx(user_id=u), k=-(2**31)), {INVALID},
         "k"),
        ("Recommend", ranking_pb2.RecommendRequest(user=ctx(user_id=u), retrieval_budget=big),
         {INVALID}, "retrieval_budget"),
        # duplicates, unknown users and items
        ("Rank", ranking_pb2.RankRequest(user=ctx(user_id="nobody-ever"),
                                         candidate_item_ids=[i, i, i, "no-such-item"], top_k=5),
         {OK}, ""),
        ("Retrieve", retrieval_pb2.RetrieveRequest(
            user=ctx(user_id="nobody-ever", recent_item_ids=[i, i, "no-such-item"]),
            sources=["popular", "popular"]), {OK}, ""),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id="no-such-item", k=5),
         {NOT_FOUND}, "no-such-item"),
        ("RecordInteraction", retrieval_pb2.RecordInteractionRequest(user_id=u,
                                                                     item_id="no-such-item"),
         {NOT_FOUND}, "no-such-item"),
        ("Recommend", ranking_pb2.RecommendRequest(user=ctx(user_id="nobody-ever"), k=5), {OK}, ""),
        ("Recommend", ranking_pb2.RecommendRequest(user=ctx(user_id=u), sources=["nope"]),
         {INVALID}, "sources[0]"),
        # a field echoed in the message must not push it past gRPC's trailer limit
        ("Retrieve", retrieval_pb2.RetrieveRequest(user=ctx(user_id=u), sources=["s" * 100_000]),
         {INVALID}, "sources[0]"),
        ("Retrieve", retrieval_pb2.RetrieveRequest(user=ctx(user_id=u, variant="v" * 100_000)),
         {INVALID}, "user.variant"),
        ("Recommend", ranking_pb2.RecommendRequest(user=ctx(user_id=u, variant="v" * 100_000)),
         {INVALID}, "user.variant"),
        # a million recent ids is refused by count, before any per-id work
        ("Rank", ranking_pb2.RankRequest(user=ctx(user_id=u, recent_item_ids=million),
                                         candidate_item_ids=[i]),
         {INVALID}, "user.recent_item_ids: 1000000 ids"),
        # a NUL inside an id (numpy would keep it, unlike a trailing one)
        ("Rank", ranking_pb2.RankRequest(user=ctx(user_id=u, exclude_item_ids=[i, "a\x00b"]),
                                         candidate_item_ids=[i]),
         {INVALID}, "user.exclude_item_ids[1]"),
        # over retrieval's budget limit (not ranking's): named as the caller's field
        ("Recommend", ranking_pb2.RecommendRequest(user=ctx(user_id=u), retrieval_budget=5001),
         {INVALID}, "retrieval_budget"),
    ]  # fmt: skip


async def test_hand_picked_hostile_messages(services, catalogue):
    items, users = catalogue
    for rpc, req, allowed, text in hostile_cases(items, users):
        code, details, took = await call(target_of(services, rpc), rpc, req.SerializeToString())
        label = f"{rpc} ({text or 'valid'})"
        assert code in allowed, f"{label}: {code.name} {details[:200]}"
        check_answer(rpc, code, details)
        assert text in details, f"{label}: {details[:200]}"
        assert took < 10.0, f"{label} took {took:.1f} s"
        await assert_both_healthy(services)


@pytest.mark.parametrize("rpc", ["Retrieve", "Rank"])
async def test_message_over_the_limit_is_resource_exhausted_at_once(services, catalogue, rpc):
    _items, users = catalogue
    ctx = common_pb2.UserContext(user_id=users[0])
    filler = ["x" * 200] * 50_000  # ~10 MB, over the deliberate 8 MiB limit
    if rpc == "Rank":
        req = ranking_pb2.RankRequest(user=ctx, candidate_item_ids=filler)
    else:
        ctx.exclude_item_ids.extend(filler)
        req = retrieval_pb2.RetrieveRequest(user=ctx)
    payload = req.SerializeToString()
    assert len(payload) > 8 * 1024 * 1024
    code, details, took = await call(target_of(services, rpc), rpc, payload)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "larger than max" in details
    assert took < 10.0
    await assert_both_healthy(services)

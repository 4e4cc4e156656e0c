"""TopListCache: which keys it keeps, when a copy answers, and its bound."""

from __future__ import annotations

from recsys import redis_keys
from retrieval_service.sources.base import TopListCache

ENTRIES = [(f"i{n}", float(100 - n)) for n in range(30)]


def test_only_this_versions_keys_are_cacheable():
    cache = TopListCache("7")
    assert cache.cacheable(redis_keys.top_genre("7", "Drama"))
    assert cache.cacheable(redis_keys.top_popular("7"))
    assert not cache.cacheable(redis_keys.top_genre("70", "Drama")), "prefix must end at ':'"
    assert not cache.cacheable(redis_keys.top_genre("6", "Drama"))
    assert not cache.cacheable(redis_keys.user_watched("7"))
    key = redis_keys.top_genre("6", "Drama")
    cache.put(key, ENTRIES, 30)
    assert cache.get(key, 5) is None and len(cache) == 0


def test_a_copy_answers_up_to_what_was_asked():
    cache = TopListCache("1", min_width=10)
    key = redis_keys.top_country("1", "fr")
    assert cache.width(4) == 10 and cache.width(25) == 25
    assert cache.get(key, 3) is None
    cache.put(key, ENTRIES[:10], 10)
    assert cache.get(key, 3) == ENTRIES[:3]
    assert cache.get(key, 10) == ENTRIES[:10]
    assert cache.get(key, 11) is None, "the list may be longer than the copy"
    cache.put(key, ENTRIES, 40)  # fewer than asked: the whole list
    assert cache.get(key, 1000) == ENTRIES
    cache.put(key, ENTRIES[:5], 5)  # a narrower read never replaces a wider copy
    assert cache.get(key, 20) == ENTRIES[:20]


def test_empty_replies_are_not_kept_and_the_key_count_is_bounded():
    cache = TopListCache("1", max_keys=2)
    empty = redis_keys.top_country("1", "nowhere")
    cache.put(empty, [], 1000)
    assert cache.get(empty, 5) is None, "a list published later must still be read"
    keys = [redis_keys.top_genre("1", g) for g in ("a", "b", "c")]
    for key in keys:
        cache.put(key, ENTRIES, 1000)
    assert len(cache) == 2
    assert cache.get(keys[0], 5) == ENTRIES[:5]
    assert cache.get(keys[2], 5) is None


def test_derived_answers_are_bounded_and_the_questions_asked_now_are_kept():
    cache = TopListCache("1", max_keys=2)
    assert cache.recall(("top_genre", ("Drama",), 10)) is None
    cache.remember(("top_genre", ("Drama",), 10), "a")
    cache.remember(("top_genre", ("Comedy",), 10), "b")
    assert cache.recall(("top_genre", ("Drama",), 10)) == "a"
    assert cache.recall(("top_genre", ("Drama",), 11)) is None, "k is part of the key"
    # Past the bound the memo starts over: a full memo kept for the version's
    # life would recompute every new question from then on.
    cache.remember(("top_genre", ("Horror",), 10), "c")
    assert cache.recall(("top_genre", ("Horror",), 10)) == "c"
    assert cache.recall(("top_genre", ("Drama",), 10)) is None
    assert len(cache._derived) <= 2

"""The user key schema: no id can name another user's keys."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from recsys import redis_keys

_IDS = st.text(alphabet="ab}{\\:e", max_size=8)


@given(_IDS, _IDS, _IDS)
@example("bob", "bob}:event:e", "e}")
@example("a\\", "a\\}", "x")
def test_no_user_id_names_another_users_keys(a, b, event):
    """An unescaped ``}`` let user ``bob}:event:e`` write user ``bob``'s event ``e}``."""
    keys_a = {redis_keys.user_state(a), redis_keys.user_watched(a), redis_keys.user_recent(a)}
    keys_b = {redis_keys.user_state(b), redis_keys.user_watched(b), redis_keys.user_recent(b)}
    if a != b:
        assert not keys_a & keys_b
        assert redis_keys.user_event(a, event) not in keys_b
        assert redis_keys.user_event(a, event) != redis_keys.user_event(b, event)
    assert redis_keys.user_event(a, event) not in keys_a


def test_ids_without_a_brace_or_backslash_keep_their_keys():
    assert redis_keys.user_state("42") == "recsys:user:{42}"
    assert redis_keys.user_event("u:1", "e}") == "recsys:user:{u:1}:event:e}"
    assert redis_keys.user_state("b}") == "recsys:user:{b\\}}"

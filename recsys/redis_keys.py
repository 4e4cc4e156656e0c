"""The Redis key schema, in one place.

Model outputs (top lists) are scoped by version so a publish can load a new
version beside the running one and switch with one ``SET`` of the pointer.
Per-user state is *not* version-scoped: it is facts about users (what they
watched and rated), written online by ``RecordInteraction`` and still true
after a retrain. User keys carry the user id in a hash tag (``{...}``) so all
of one user's keys live in one Redis Cluster slot and one pipeline can read
them.

=====================================  ======  =========================================
key                                    type    holds
=====================================  ======  =========================================
``recsys:current_version``             string  version the services should serve
``recsys:versions``                    zset    published versions, scored by publish time
``recsys:versions:pending``            zset    versions a publish is writing, by start time
``recsys:versions:removing:<ver>``     string  a clean-up is deleting the version (expires)
``recsys:versions:removals:<ver>``     string  clean-ups that claimed the version (expires)
``recsys:v:<ver>:top:genre:<genre>``   zset    item id -> damped mean rating
``recsys:v:<ver>:top:country:<c>``     zset    item id -> score within the country
``recsys:v:<ver>:top:popular``         zset    item id -> popularity score
``recsys:v:<ver>:<list>:staging:<t>``  zset    a list being written, renamed over ``<list>``
``recsys:v:<ver>:build``               string  manifest digest of the build the lists are of
``recsys:user:{<uid>}``                hash    profile + running aggregates (features)
``recsys:user:{<uid>}:watched``        set     every item id the user interacted with
``recsys:user:{<uid>}:recent``         list    most recent item ids, newest first, capped
``recsys:user:{<uid>}:event:<id>``     string  a recorded event id (for dedupe_window_s)
``recsys:user:{<uid>}:log``            stream  online interactions (replayed by publish), capped
``recsys:user:{<uid>}:log:<kind>``     hash    the log's watches' or ratings' increments, summed
``recsys:user:{<uid>}:log:retired``    hash    the counts of the watches the log's cap pushed out
=====================================  ======  =========================================

``<uid>`` has backslashes and ``}`` escaped (see :func:`_user`).
"""

from __future__ import annotations

PREFIX = "recsys"
CURRENT_VERSION = f"{PREFIX}:current_version"
VERSIONS = f"{PREFIX}:versions"
# Versions being written by a publish (zset: start time). Not counted toward
# ``--keep``: a cleanup removes one only when its publish died long ago.
VERSIONS_PENDING = f"{PREFIX}:versions:pending"


def removing(version: str) -> str:
    """Set while a clean-up deletes ``version``'s keys; a publish of it is refused meanwhile.

    Outside the version's prefix, so the deletion it guards does not delete it.
    """
    return f"{VERSIONS}:removing:{version}"


def removals(version: str) -> str:
    """Counter of the clean-ups that have claimed ``version`` for removal.

    A publish reads it when it marks the version pending and switches only if
    it is unchanged: a removal that began meanwhile may have deleted keys it
    wrote. Outside the version's prefix, so the deletion does not delete it.
    """
    return f"{VERSIONS}:removals:{version}"


def _version_prefix(version: str) -> str:
    return f"{PREFIX}:v:{version}"


def version_prefix(version: str) -> str:
    """Prefix (with the trailing ``:``) shared by every key of one version."""
    return f"{_version_prefix(version)}:"


def top_genre(version: str, genre: str) -> str:
    """Sorted set of the best items in one genre."""
    return f"{_version_prefix(version)}:top:genre:{genre}"


def top_country(version: str, country: str) -> str:
    """Sorted set of the best items among users of one country."""
    return f"{_version_prefix(version)}:top:country:{country}"


def top_popular(version: str) -> str:
    """Sorted set of the most popular items overall."""
    return f"{_version_prefix(version)}:top:popular"


def version_build(version: str) -> str:
    """Which build of ``version`` its top lists were published for (its manifest digest).

    A version number reused after its directory was deleted names another
    build, with other lists: retrieval keeps in-process copies of a served
    build's lists only while this names that build. Written by ``recsys
    publish`` in one transaction with the lists' renames; versions published
    before it existed have none (their build is unknown).
    """
    return f"{_version_prefix(version)}:build"


def staging(key: str, token: str) -> str:
    """Where one publish (``token``) writes a version's list ``key`` before renaming it over.

    Under the version's prefix, so the version's clean-up also removes a copy
    an interrupted publish left; the token keeps two publishes of one
    version from writing into each other's copy.
    """
    return f"{key}:staging:{token}"


def version_pattern(version: str) -> str:
    """``SCAN`` pattern matching every key of one version (for cleanup)."""
    return f"{_version_prefix(version)}:*"


def _user(user_id: str) -> str:
    """``recsys:user:{<uid>}`` with backslashes and ``}`` in the id escaped.

    Unescaped, the first ``}`` after the id did not mark its end: user
    ``bob}:event:e`` had the key of user ``bob``'s event ``e}``, so one user's
    write could pass for another's recorded event or break its state. Ids
    without either character (nearly all) keep the keys they always had.
    """
    if "}" in user_id or "\\" in user_id:
        user_id = user_id.replace("\\", "\\\\").replace("}", "\\}")
    return f"{PREFIX}:user:{{{user_id}}}"


def user_state(user_id: str) -> str:
    """Hash with the user's profile and feature aggregates."""
    return _user(user_id)


def user_watched(user_id: str) -> str:
    """Set of every item the user interacted with."""
    return f"{_user(user_id)}:watched"


def user_recent(user_id: str) -> str:
    """List of recent item ids, newest first."""
    return f"{_user(user_id)}:recent"


def user_log(user_id: str) -> str:
    """Stream of the interactions recorded online, oldest first, capped.

    A publish that replaces the user's aggregates with batch values replays
    these onto them, since the trainer's data does not hold them.
    """
    return f"{_user(user_id)}:log"


def user_log_sums(user_id: str, kind: str) -> str:
    """Hash of the summed aggregate increments of the log's ``watches`` or ``ratings``.

    Kept equal to the log's entries by every script that changes the log, so
    a publish adds a user's logged interactions back with one read instead
    of one write per field of every entry.
    """
    return f"{_user(user_id)}:log:{kind}"


def user_retired_watches(user_id: str) -> str:
    """Hash of the summed counts of the watches the log's cap pushed out.

    A publish adds every watch back onto the batch aggregates (no training
    data holds one), so those that left the log must still count.
    """
    return f"{_user(user_id)}:log:retired"


def user_event(user_id: str, event_id: str) -> str:
    """Marker of one recorded interaction (``RecordInteraction.event_id``), for retries."""
    return f"{_user(user_id)}:event:{event_id}"

"""Dataset.with_logged: ratings and users from the interaction logs beside a dataset's own."""

import numpy as np
import pytest

from trainer.loaders import load_dataset

DATA = "synthetic:users=40,items=30,ratings=600,seed=1"


def _ratings(users, items, ratings=None):
    n = len(users)
    return {
        "rating_user": users,
        "rating_item": items,
        "rating": ratings if ratings is not None else [4.0] * n,
        "timestamp": list(range(n)),
    }


def test_new_users_follow_the_datasets_own_and_leave_its_hash_alone():
    data = load_dataset(DATA)
    n = data.n_users
    merged = data.with_logged(["x", "y"], **_ratings([n + 1, 0, n], [3, 4, 5]))
    assert merged.user_ids == [*data.user_ids, "x", "y"]
    assert (merged.n_own_users, merged.logged_users, merged.logged_rows) == (n, 2, 3)
    assert merged.user_country[n:] == ["", ""] and merged.user_occupation[n:] == [None, None]
    assert np.isnan(merged.user_age[n:]).all()
    assert merged.sha256() == data.sha256()
    # The ids are part of what the version trained on: other ids, another hash.
    other = data.with_logged(["x", "z"], **_ratings([n + 1, 0, n], [3, 4, 5]))
    assert other.logged_sha256() != merged.logged_sha256()
    # Merging again replaces both; merging nothing gives the dataset back.
    again = merged.with_logged(["q"], **_ratings([n], [1]))
    assert again.user_ids[n:] == ["q"] and again.logged_rows == 1
    back = merged.with_logged()
    assert back.user_ids == data.user_ids and back.n_ratings == data.n_ratings
    assert back.logged_sha256() == data.logged_sha256()


def test_a_logged_rating_without_new_users_hashes_as_before():
    """Versions trained before new users were kept recorded this hash: it must not move."""
    import hashlib

    data = load_dataset(DATA)
    cols = _ratings([0, 1], [2, 3])
    merged = data.with_logged(**cols)
    h = hashlib.sha256()
    for name, dtype in (("rating_user", np.int32), ("rating_item", np.int32),
                        ("rating", np.float32), ("timestamp", np.int64)):  # fmt: skip
        h.update(np.asarray(cols[name], dtype).tobytes())
    assert merged.logged_sha256() == h.hexdigest()


@pytest.mark.parametrize(
    "users, rows, problem",
    [
        (["u-new"], [41], "outside"),  # one past the appended user
        ([], [40], "outside"),
        (["dup", "dup"], [40], "distinct"),
        (None, [0], "distinct"),  # an id the dataset has (filled in below)
    ],
)
def test_bad_users_or_rows_are_refused(users, rows, problem):
    data = load_dataset(DATA)
    assert data.n_users == 40
    with pytest.raises(ValueError, match=problem):
        data.with_logged(users if users is not None else [data.user_ids[3]], **_ratings(rows, [0]))


def test_new_users_join_the_unknown_country_bucket_where_the_data_has_one():
    """A constant country column stays constant: the loader's bucket, not no country."""
    import dataclasses

    from trainer.loaders import DEFAULT_COUNTRY

    data = load_dataset(DATA)
    assert DEFAULT_COUNTRY not in data.user_country
    assert data.with_logged(["x"], **_ratings([data.n_users], [0])).user_country[-1] == ""
    bucket = dataclasses.replace(data, user_country=[DEFAULT_COUNTRY] * data.n_users)
    merged = bucket.with_logged(["x"], **_ratings([data.n_users], [0]))
    assert merged.user_country[-1] == DEFAULT_COUNTRY

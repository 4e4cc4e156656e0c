"""Training-split aggregates, top lists and evaluation helpers (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.features import UserAggregates, item_feature_matrix, user_feature_vector
from trainer.dataset import DataError, Dataset
from trainer.evaluate import _auc, _rank_metrics, bias_baseline
from trainer.export import top_lists
from trainer.prepare import prepare


def _dataset(ratings: list[tuple[int, int, float, int]]) -> Dataset:
    u, i, r, t = (np.array(x) for x in zip(*ratings, strict=True))
    return Dataset(
        name="hand",
        source="test",
        genres=["Comedy", "Drama"],
        user_ids=["a", "b", "c"],
        user_age=np.array([30.0, np.nan, 50.0]),
        user_gender=["F", None, "M"],
        user_occupation=["writer", None, "doctor"],
        user_country=["us", "us", "de"],
        item_ids=["x", "y", "z", "w"],
        item_title=["X", "Y", "Z", "W"],
        item_year=np.array([1990.0, np.nan, 2001.0, 1980.0]),
        item_genres=np.array([[1, 0], [0, 1], [1, 1], [0, 1]], np.uint8),
        rating_user=u.astype(np.int32),
        rating_item=i.astype(np.int32),
        rating=r.astype(np.float32),
        timestamp=t.astype(np.int64),
    )


RATINGS = [
    (0, 0, 5, 30), (0, 1, 3, 10), (0, 2, 4, 20),
    (1, 2, 2, 5), (1, 3, 5, 6),
    (2, 0, 1, 1), (2, 3, 4, 2), (2, 1, 2, 3),
]  # fmt: skip


def test_aggregates_match_folding_interactions_one_by_one():
    d = _dataset(RATINGS)
    train = np.array([0, 1, 2, 3, 5, 6])
    p = prepare(d, train, np.array([4, 7]))
    for u in range(3):
        agg = UserAggregates.empty(p.spec)
        for row in train[d.rating_user[train] == u]:
            agg.add(d.item_genres[d.rating_item[row]], float(d.rating[row]))
        got = UserAggregates.from_flat(p.user_agg[u], 2)
        assert (got.watch_count, got.rated_count, got.rating_sum) == (
            agg.watch_count, agg.rated_count, agg.rating_sum,
        )  # fmt: skip
        np.testing.assert_array_equal(got.genre_sum, agg.genre_sum)
        np.testing.assert_array_equal(got.genre_watch, agg.genre_watch)
        # The matrix row is exactly what serving computes from the same aggregates.
        np.testing.assert_array_equal(
            p.user_features[u], user_feature_vector(p.spec, p.profile(u), agg)
        )
    assert p.spec.global_mean == pytest.approx(np.mean(d.rating[train]))
    assert p.item_count.tolist() == [2, 1, 2, 1]
    # Histories are training items only, oldest first.
    assert p.histories[0] == [1, 2, 0]
    assert p.histories[1] == [2]


def test_leave_one_out_removes_the_rows_own_rating():
    d = _dataset(RATINGS)
    p = prepare(d, np.arange(8), np.array([], np.int64))
    # Row 4 is user b's rating of w; without it b has only item z (rated 2).
    only_z = UserAggregates.empty(p.spec)
    only_z.add(d.item_genres[2], 2.0)
    uf, itf = p.row_features(np.array([4]), leave_one_out=True)
    np.testing.assert_allclose(uf[0], user_feature_vector(p.spec, p.profile(1), only_z), rtol=1e-6)
    # Item w keeps its other rating (c gave 4) only.
    assert itf[0, -1] == pytest.approx(np.log1p(1.0))
    plain, _ = p.row_features(np.array([4]), leave_one_out=False)
    assert not np.allclose(plain[0], uf[0])


def test_leave_one_out_removes_every_rating_of_a_pair_rated_twice():
    """A logged re-rating of a pair the data has trains beside it: taking out only
    the row's own rating left the other in the means, and with it the label."""
    # Row 8 is user b rating w again (1 star), as a logged rating appended to the data.
    d = _dataset([*RATINGS, (1, 3, 1, 9)])
    p = prepare(d, np.arange(9), np.array([], np.int64))
    only_z = UserAggregates.empty(p.spec)
    only_z.add(d.item_genres[2], 2.0)
    for row in (4, 8):
        uf, itf = p.row_features(np.array([row, 0]), leave_one_out=True)
        np.testing.assert_allclose(
            uf[0], user_feature_vector(p.spec, p.profile(1), only_z), rtol=1e-6
        )
        # Item w keeps c's rating (4) only.
        w_alone = item_feature_matrix(
            p.spec,
            genre_matrix=d.item_genres[[3]],
            year=d.item_year[[3]],
            rating_count=np.array([1.0]),
            rating_sum=np.array([4.0]),
        )
        np.testing.assert_allclose(itf[0], w_alone[0], rtol=1e-6)
        # A row of a pair rated once still loses just its own rating.
        single, _ = p.row_features(np.array([0]), leave_one_out=True)
        np.testing.assert_array_equal(uf[1], single[0])


def test_top_lists_damp_items_with_few_ratings():
    # Item 0: two 5-star ratings; item 1: forty 4.5-star ratings.
    rows = [(0, 0, 5, 1), (1, 0, 5, 2)] + [(k % 3, 1, 4.5, 10 + k) for k in range(40)]
    d = _dataset(rows)
    p = prepare(d, np.arange(len(rows)), np.array([], np.int64))
    lists = top_lists(p)
    assert lists["popular"][0][0] == "y"
    drama = [e[0] for e in lists["genre"]["Drama"]]
    assert drama == ["y"]  # z and w have no training ratings
    comedy = [e[0] for e in lists["genre"]["Comedy"]]
    assert comedy == ["x"]
    both = prepare(d, np.arange(len(rows)), np.array([], np.int64))
    assert set(lists["country"]) <= set(both.spec.countries)
    us = [e[0] for e in lists["country"]["us"]]
    assert us[0] == "y"  # 40 good ratings beat 2 perfect ones


def test_top_list_ties_go_the_way_redis_orders_them():
    """ZREVRANGE orders equal scores by member, descending; so must the exported list."""
    from trainer.export import _ranked

    ids = ["a", "b10", "b9", "é", "c"]
    # 2.0000001 and 2.0 are one score once rounded to the 6 decimals exported.
    score = np.array([2.0, 2.0000001, 1.0, 2.0, 3.0])
    got = _ranked(ids, score, np.ones(5, bool), 5)
    assert [i for i, _ in got] == ["c", "é", "b10", "a", "b9"]
    assert _ranked(ids, score, np.array([1, 0, 1, 1, 0], bool), 2) == [["é", 2.0], ["a", 2.0]]


def test_bias_baseline_recovers_offsets():
    rng = np.random.default_rng(0)
    n_u, n_i = 40, 30
    bu, bi = rng.normal(0, 0.5, n_u), rng.normal(0, 0.5, n_i)
    pairs = [(u, i) for u in range(n_u) for i in range(n_i)]
    rows = [(u, i, 3.5 + bu[u] + bi[i], k) for k, (u, i) in enumerate(pairs)]
    d = _dataset([(0, 0, 3, 0)])
    d.user_ids = [f"u{k}" for k in range(n_u)]
    d.user_age = np.full(n_u, np.nan)
    d.user_gender = d.user_occupation = [None] * n_u
    d.user_country = ["us"] * n_u
    d.item_ids = [f"i{k}" for k in range(n_i)]
    d.item_title = d.item_ids
    d.item_year = np.full(n_i, 2000.0)
    d.item_genres = np.ones((n_i, 2), np.uint8)
    u, i, r, t = (np.array(x) for x in zip(*rows, strict=True))
    d.rating_user, d.rating_item, d.rating, d.timestamp = u, i, r.astype(np.float32), t
    p = prepare(d, np.arange(len(rows)), np.array([], np.int64))
    mu, fbu, fbi = bias_baseline(p)
    pred = mu + fbu[u] + fbi[i]
    # Shrinkage keeps it from a perfect fit, but it must explain most of the spread.
    assert np.sqrt(np.mean((pred - r) ** 2)) < 0.5 * np.std(r)


def test_rank_metrics_and_auc():
    assert _rank_metrics(np.array([3, 1, 2]), {3}) == (1.0, 1.0)
    recall, ndcg = _rank_metrics(np.array([9, 3]), {3, 4})
    assert recall == 0.5
    assert ndcg == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert _auc(np.array([0.1, 0.9, 0.8]), np.array([False, True, True])) == 1.0
    assert _auc(np.array([0.9, 0.1]), np.array([False, True])) == 0.0


def test_no_training_ratings_is_a_clear_error():
    d = _dataset(RATINGS)
    with pytest.raises(DataError, match="no training ratings"):
        prepare(d, np.array([], np.int64), np.arange(8))


@pytest.mark.parametrize(
    ("n", "fraction", "side"), [(2, 0.2, "test"), (1, 0.5, "training"), (4, 0.05, "test")]
)
def test_a_split_with_an_empty_side_is_a_clear_error(n, fraction, side):
    """An empty test split made NaN metrics (invalid JSON in metrics.json)."""
    d = _dataset(RATINGS[:n])
    with pytest.raises(DataError, match=f"{n} rating.*test_fraction of {fraction}.*{side} split"):
        d.split(fraction)


def test_ids_the_services_would_refuse_are_refused_at_training():
    """Trained in, a 330-byte item id was recommended, then refused by RecordInteraction."""
    import dataclasses

    d = _dataset(RATINGS)
    d.check_ids(256)
    long_item = dataclasses.replace(d, item_ids=["x", "y", "u" * 330, "w"])
    with pytest.raises(DataError, match=r"item id 'u{40}'… \(item 3 of 4\) is 330 bytes long"):
        long_item.check_ids(256)
    long_item.check_ids(330)  # within a raised max_id_bytes
    nul_user = dataclasses.replace(d, user_ids=["a", "b\x00", "c"])
    with pytest.raises(DataError, match=r"user id 'b\\x00' \(user 2 of 3\) contains a NUL"):
        nul_user.check_ids(256)


def test_a_small_dataset_splits_both_ways():
    train, test = _dataset(RATINGS[:3]).split(0.2)
    assert len(train) == 2 and len(test) == 1
    assert sorted([*train, *test]) == [0, 1, 2]


def test_sampled_negatives_are_unrated_and_belong_to_each_rows_user():
    from trainer.train import add_negatives, sample_negatives

    d = _dataset(RATINGS)
    train = np.array([0, 1, 2, 3, 5, 6])
    p = prepare(d, train, np.array([4, 7]))
    users, items = sample_negatives(p, train, 50, np.random.default_rng(3))
    rated = set(zip(d.rating_user[train].tolist(), d.rating_item[train].tolist(), strict=True))
    pairs = set(zip(users.tolist(), items.tolist(), strict=True))
    assert pairs and not pairs & rated  # every draw that hit a training rating was dropped
    # A user gets negatives in proportion to its rating rows, never more than 50 each.
    counts = np.bincount(users, minlength=3)
    rows_per_user = np.bincount(d.rating_user[train], minlength=3)
    assert (counts <= 50 * rows_per_user).all() and (counts > 0).all()
    # User 0 rated 3 of the 4 items, so only item 3 is left for it.
    assert set(items[users == 0].tolist()) == {3}
    # Same generator state, same sample.
    again = sample_negatives(p, train, 50, np.random.default_rng(3))
    np.testing.assert_array_equal(again[0], users)
    np.testing.assert_array_equal(again[1], items)

    x = (p.user_features[[0, 1]], p.item_features[[0, 2]])
    y = np.ones((2, 1), np.float32)
    (xu, xi), y_all = add_negatives(p, train[:2], x, y, 4, np.random.default_rng(0), ids=False)
    n_neg = xu.shape[0] - 2
    assert n_neg > 0 and xi.shape[0] == xu.shape[0] == y_all.shape[0]
    np.testing.assert_array_equal(y_all[:2], y)
    assert (y_all[2:] == 0).all()
    # Negatives carry the full training features of their user and item.
    u_neg, i_neg = sample_negatives(p, train[:2], 4, np.random.default_rng(0))
    np.testing.assert_array_equal(xu[2:], p.user_features[u_neg])
    np.testing.assert_array_equal(xi[2:], p.item_features[i_neg])

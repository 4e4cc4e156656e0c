"""The synthetic generator: determinism, shape, and that its hidden tastes show in the data."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.cli import main
from trainer.dataset import DataError, Dataset
from trainer.loaders import load_dataset
from trainer.synthetic import (
    DEFAULT_COUNTRIES,
    DEFAULT_GENRES,
    OCCUPATIONS,
    SyntheticTruth,
    generate,
    generate_with_truth,
    write_csv,
)


@pytest.fixture(scope="module")
def default() -> tuple[Dataset, SyntheticTruth]:
    return generate_with_truth()


def test_same_seed_same_dataset():
    a = generate(n_users=300, n_items=250, n_ratings=6000, seed=7)
    b = generate(n_users=300, n_items=250, n_ratings=6000, seed=7)
    assert a.sha256() == b.sha256()
    np.testing.assert_array_equal(a.rating, b.rating)
    np.testing.assert_array_equal(a.timestamp, b.timestamp)
    assert a.item_title == b.item_title
    c = generate(n_users=300, n_items=250, n_ratings=6000, seed=8)
    assert c.sha256() != a.sha256()


def test_default_sizes_and_types(default):
    ds, _ = default
    assert (ds.n_users, ds.n_items, ds.n_ratings) == (2000, 1500, 100_000)
    assert ds.genres == list(DEFAULT_GENRES)
    assert sorted(set(ds.user_country)) == sorted(DEFAULT_COUNTRIES[:6])
    assert ds.rating_user.dtype == np.int32 and ds.rating_item.dtype == np.int32
    assert ds.rating.dtype == np.float32 and ds.timestamp.dtype == np.int64
    assert ds.item_genres.dtype == np.uint8 and ds.item_genres.shape == (1500, len(ds.genres))
    assert ds.user_age.shape == (2000,) and ds.item_year.shape == (1500,)
    assert len(set(ds.user_ids)) == 2000 and len(set(ds.item_ids)) == 1500
    assert ds.rating_user.max() < ds.n_users and ds.rating_item.max() < ds.n_items
    assert ds.source == "synthetic:users=2000,items=1500,ratings=100000,countries=6,seed=0"


def test_no_duplicate_pairs_and_every_user_rates(default):
    ds, _ = default
    pairs = ds.rating_user.astype(np.int64) * ds.n_items + ds.rating_item
    assert np.unique(pairs).size == ds.n_ratings
    assert np.bincount(ds.rating_user, minlength=ds.n_users).min() >= 1


def test_ratings_are_whole_stars_in_range_and_spread(default):
    ds, _ = default
    assert ds.rating.min() >= 1 and ds.rating.max() <= 5
    assert np.all(ds.rating == np.round(ds.rating))
    counts = np.bincount(ds.rating.astype(int), minlength=6)[1:]
    assert (counts > 0.005 * ds.n_ratings).all(), counts  # all five star values in use
    assert 3.0 < ds.rating.mean() < 4.0


def test_half_stars():
    ds = generate(n_users=200, n_items=150, n_ratings=4000, half_stars=True)
    assert np.all(ds.rating * 2 == np.round(ds.rating * 2))
    assert np.any(ds.rating != np.round(ds.rating))
    assert ds.rating.min() >= 1 and ds.rating.max() <= 5


def test_timestamps_sorted_per_user_and_after_release(default):
    ds, _ = default
    assert np.all(np.diff(ds.rating_user) >= 0)
    same_user = np.diff(ds.rating_user) == 0
    assert np.all(np.diff(ds.timestamp)[same_user] >= 0)
    release = (ds.item_year[ds.rating_item].astype(np.int64) - 1970).astype("datetime64[Y]")
    assert np.all(ds.timestamp >= release.astype("datetime64[s]").astype(np.int64))


def test_users_rate_preferred_genres_higher(default):
    ds, truth = default
    on_pref = (
        ds.item_genres[ds.rating_item].astype(bool) & truth.user_pref_genres[ds.rating_user]
    ).any(1)
    n = ds.n_users
    sum_pref = np.bincount(ds.rating_user, ds.rating * on_pref, n)
    cnt_pref = np.bincount(ds.rating_user, on_pref, n)
    sum_other = np.bincount(ds.rating_user, ds.rating * ~on_pref, n)
    cnt_other = np.bincount(ds.rating_user, ~on_pref, n)
    both = (cnt_pref >= 3) & (cnt_other >= 3)
    gap = sum_pref[both] / cnt_pref[both] - sum_other[both] / cnt_other[both]
    assert both.sum() > 0.5 * n
    assert np.mean(gap > 0) > 0.8, np.mean(gap > 0)
    assert gap.mean() > 0.3, gap.mean()


def test_users_watch_preferred_genres_more_than_the_catalogue_offers(default):
    ds, truth = default
    item_hot = ds.item_genres.astype(bool)
    watched = (item_hot[ds.rating_item] & truth.user_pref_genres[ds.rating_user]).any(1).mean()
    # Share of the catalogue that would hit a user's preferred genres if users picked at random.
    offered = (truth.user_pref_genres.astype(np.float32) @ item_hot.T.astype(np.float32) > 0).mean()
    assert watched > offered + 0.1, (watched, offered)


def test_disliked_genre_is_rated_lowest(default):
    ds, truth = default
    disliked = ds.item_genres[ds.rating_item, truth.user_disliked_genre[ds.rating_user]] == 1
    assert disliked.sum() > 100
    assert ds.rating[disliked].mean() < ds.rating[~disliked].mean() - 0.3


def test_top_per_country_lists_differ(default):
    ds, _ = default
    country = np.asarray(ds.user_country)[ds.rating_user]
    tops = {}
    for c in sorted(set(ds.user_country)):
        counts = np.bincount(ds.rating_item[country == c], minlength=ds.n_items)
        tops[c] = set(np.argsort(-counts, kind="stable")[:20].tolist())
    names = sorted(tops)
    overlaps = [len(tops[a] & tops[b]) / 20 for a in names for b in names if a < b]
    assert max(overlaps) < 0.7, overlaps
    assert np.mean(overlaps) < 0.5, overlaps


def test_home_country_films_rated_higher_at_home(default):
    ds, truth = default
    user_country = np.array([truth.countries.index(c) for c in ds.user_country])
    home = truth.item_country[ds.rating_item] == user_country[ds.rating_user]
    assert 0.1 < home.mean() < 0.9
    assert ds.rating[home].mean() > ds.rating[~home].mean() + 0.1


def test_item_popularity_is_long_tailed(default):
    ds, _ = default
    counts = np.sort(np.bincount(ds.rating_item, minlength=ds.n_items))[::-1]
    top_5pc = counts[: ds.n_items // 20].sum() / ds.n_ratings
    assert top_5pc > 0.2, top_5pc  # uniform would be 0.05
    assert counts[-1] < counts[0] / 20


def test_demographics_plausible_and_tied_to_tastes(default):
    ds, truth = default
    assert set(ds.user_gender) == {"M", "F"}
    assert set(ds.user_occupation) <= set(OCCUPATIONS)
    assert ds.user_age.min() >= 13 and ds.user_age.max() <= 85
    occ = np.asarray(ds.user_occupation)
    assert ds.user_age[occ == "retired"].mean() > ds.user_age[occ == "student"].mean() + 20
    female = np.asarray(ds.user_gender) == "F"
    pref_gap = np.abs(
        truth.user_pref_genres[female].mean(0) - truth.user_pref_genres[~female].mean(0)
    )
    assert pref_gap.max() > 0.05, pref_gap
    old = ds.user_age > 45
    assert (
        np.abs(truth.user_pref_genres[old].mean(0) - truth.user_pref_genres[~old].mean(0)).max()
        > 0.05
    )


def test_custom_vocabularies_and_many_countries():
    ds = generate(n_users=100, n_items=80, n_ratings=1500, n_countries=15, genres=5)
    assert ds.genres == list(DEFAULT_GENRES[:5])
    assert set(ds.user_country) <= set(DEFAULT_COUNTRIES) | {"x13", "x14", "x15"}
    ds = generate(n_users=50, n_items=40, n_ratings=500, genres=["A", "B", "C"], countries=["aa"])
    assert ds.genres == ["A", "B", "C"] and set(ds.user_country) == {"aa"}
    assert (ds.item_genres.sum(1) >= 1).all()
    ds = generate(n_users=50, n_items=40, n_ratings=500, genres=21, years=(1990, 1995))
    assert ds.genres[-1] == "Genre21" and len(ds.genres) == 21
    assert ds.item_year.min() >= 1990 and ds.item_year.max() <= 1995


def test_dense_request_fills_every_pair():
    ds = generate(n_users=6, n_items=5, n_ratings=30)
    assert np.unique(ds.rating_user * 5 + ds.rating_item).size == 30


def test_large_catalogue_is_fast_enough_to_use():
    ds = generate(n_users=3000, n_items=200_000, n_ratings=60_000, seed=1)
    assert ds.n_items == 200_000 and ds.n_ratings == 60_000
    assert len(ds.item_title) == 200_000 and ds.item_title[-1].endswith(")")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_users": 0}, "at least 1"),
        ({"n_users": 3, "n_items": 3, "n_ratings": 10}, "more than users x items"),
        ({"n_countries": 0}, "countries must be at least 1"),
        ({"genres": ["A", "A"]}, "distinct"),
        ({"genres": ["A|B"]}, "contains '|'"),
        ({"years": (2000, 1990)}, "first <= last"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(**{"n_users": 20, "n_items": 20, "n_ratings": 100, **kwargs})


def test_csv_round_trip_keeps_the_hash(tmp_path, default):
    ds, _ = default
    write_csv(ds, tmp_path)
    back = load_dataset(f"csv:{tmp_path}")
    assert back.sha256() == ds.sha256()
    assert back.item_title == ds.item_title
    assert (back.rating_min, back.rating_max) == (1.0, 5.0)
    assert back.name == "csv"


def test_csv_round_trip_with_unknowns_and_half_stars(tmp_path):
    ds = generate(n_users=40, n_items=30, n_ratings=400, half_stars=True, genres=["A", "B", "Zed"])
    ds.user_age[::3] = np.nan
    ds.user_gender[1] = None
    ds.user_occupation[2] = None
    ds.item_year[4] = np.nan
    ds.item_title[4] = 'No Year, "quoted"'
    ds.item_genres[5] = 0
    write_csv(ds, tmp_path)
    back = load_dataset(f"csv:{tmp_path}")
    assert back.sha256() == ds.sha256()
    assert back.genres == ["A", "B", "Zed"]  # order from genres.txt, not sorted
    assert back.item_title[4] == 'No Year, "quoted"'
    expected_min = 0.5 if ds.rating.min() < 1 else 1.0
    assert back.rating_min == expected_min


def test_csv_round_trip_keeps_titles_that_end_in_another_year(tmp_path):
    """MovieLens 100K: the release date's year is not always the title's."""
    ds = generate(n_users=20, n_items=10, n_ratings=100)
    ds.item_title[0], ds.item_year[0] = "Old Title (1995)", 1996.0
    ds.item_title[1], ds.item_year[1] = "No Year At All", 2001.0
    write_csv(ds, tmp_path)
    back = load_dataset(f"csv:{tmp_path}")
    assert back.item_title[:2] == ["Old Title (1995)", "No Year At All"]
    assert list(back.item_year[:2]) == [1996.0, 2001.0]
    assert back.sha256() == ds.sha256()


def test_a_quoted_header_with_the_year_column_loads(tmp_path):
    """A spreadsheet re-save quotes every header cell: the year column went unseen."""
    ds = generate(n_users=20, n_items=10, n_ratings=100)
    write_csv(ds, tmp_path)
    movies = (tmp_path / "movies.csv").read_text().splitlines()
    movies[0] = '"movieId","title","genres","year"'
    (tmp_path / "movies.csv").write_text("\n".join(movies) + "\n")
    assert load_dataset(f"csv:{tmp_path}").sha256() == ds.sha256()
    # Blank lines before the header are skipped, as the reader skips them.
    (tmp_path / "movies.csv").write_text("\n\n" + "\n".join(movies) + "\n")
    assert load_dataset(f"csv:{tmp_path}").sha256() == ds.sha256()


def test_a_bad_year_in_movies_csv_names_the_line(tmp_path):
    ds = generate(n_users=20, n_items=10, n_ratings=100)
    write_csv(ds, tmp_path)
    movies = (tmp_path / "movies.csv").read_text().splitlines()
    movies[3] = movies[3].rsplit(",", 1)[0] + ",nineteen"
    (tmp_path / "movies.csv").write_text("\n".join(movies) + "\n")
    with pytest.raises(DataError, match=r"movies.csv, line 4: year 'nineteen'"):
        load_dataset(f"csv:{tmp_path}")


def test_generate_data_cli(tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["generate-data", str(out), "--users", "60", "--items", "50", "--ratings", "900"]
    assert main([*argv, "--countries", "3", "--seed", "4"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "ratings.csv",
        "movies.csv",
        "users.csv",
        "genres.txt",
    }
    expected = generate(n_users=60, n_items=50, n_ratings=900, n_countries=3, seed=4)
    assert load_dataset(f"csv:{out}").sha256() == expected.sha256()
    assert expected.sha256() in capsys.readouterr().out

    assert main(["generate-data", str(out), "--users", "2", "--items", "2", "--ratings", "5"]) == 2
    assert "more than users x items" in capsys.readouterr().err


def test_synthetic_spec_matches_generate():
    ds = load_dataset("synthetic:users=120,items=90,ratings=2000,countries=2,seed=5")
    assert ds.sha256() == generate(120, 90, 2000, 2, 5).sha256()
    assert load_dataset("synthetic:seed=3,users=50,items=40,ratings=300").n_ratings == 300


@pytest.mark.parametrize(
    "spec, message",
    [
        ("synthetic:users=ten", "users='ten' is not an integer"),
        ("synthetic:colour=3", "bad entry 'colour=3'"),
        ("synthetic:users", "bad entry 'users'"),
        ("synthetic:users=2,items=2,ratings=9", "more than users x items"),
    ],
)
def test_bad_synthetic_specs(spec, message):
    with pytest.raises(DataError, match=message):
        load_dataset(spec)

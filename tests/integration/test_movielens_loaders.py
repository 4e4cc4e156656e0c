"""The loaders on the real MovieLens files (skipped when ../shared/data is absent)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from trainer.dataset import Dataset
from trainer.loaders import DEFAULT_COUNTRY, load_dataset
from trainer.synthetic import write_csv

pytestmark = pytest.mark.movielens


@pytest.fixture(scope="module")
def ml100k(ml100k_dir) -> Dataset:
    return load_dataset(f"movielens-100k:{ml100k_dir}")


@pytest.fixture(scope="module")
def latest(ml_latest_small_dir) -> Dataset:
    return load_dataset(f"movielens-latest-small:{ml_latest_small_dir}")


def genres_of(ds: Dataset, item_id: str) -> list[str]:
    row = ds.item_ids.index(item_id)
    return [g for g, on in zip(ds.genres, ds.item_genres[row], strict=True) if on]


def test_ml100k_counts(ml100k):
    assert (ml100k.n_users, ml100k.n_items, ml100k.n_ratings) == (943, 1682, 100_000)
    assert len(ml100k.genres) == 19 and ml100k.genres[0] == "unknown"
    assert ml100k.genres[1:4] == ["Action", "Adventure", "Animation"]
    assert Counter(ml100k.rating.tolist()) == {1: 6110, 2: 11370, 3: 27145, 4: 34174, 5: 21201}
    assert np.bincount(ml100k.rating_user).min() >= 20  # the release keeps users with 20+


def test_ml100k_known_facts(ml100k):
    assert ml100k.item_title[ml100k.item_ids.index("1")] == "Toy Story (1995)"
    assert genres_of(ml100k, "1") == ["Animation", "Children's", "Comedy"]
    assert ml100k.item_year[ml100k.item_ids.index("1")] == 1995
    u = ml100k.user_ids.index("1")
    assert (ml100k.user_age[u], ml100k.user_gender[u], ml100k.user_occupation[u]) == (
        24,
        "M",
        "technician",
    )
    assert ml100k.user_country[u] == "us-mountain"  # ZIP 85711, Tucson AZ
    counts = np.bincount(ml100k.rating_item, minlength=ml100k.n_items)
    assert ml100k.item_ids[int(counts.argmax())] == "50" and counts.max() == 583  # Star Wars
    first = 0  # first line of u.data: 196 242 3 881250949
    assert ml100k.user_ids[ml100k.rating_user[first]] == "196"
    assert ml100k.item_ids[ml100k.rating_item[first]] == "242"
    assert (ml100k.rating[first], ml100k.timestamp[first]) == (3, 881250949)
    assert np.isnan(ml100k.item_year).sum() == 1  # item 267 has no date and no year in its title


def test_ml100k_regions(ml100k):
    assert Counter(ml100k.user_country) == {
        "us-midwest": 276,
        "us-northeast": 193,
        "us-west": 170,
        "us-southeast": 163,
        "us-south": 67,
        "us-mountain": 56,
        "ca": 18,
    }


def test_ml100k_csv_round_trip(ml100k, tmp_path):
    write_csv(ml100k, tmp_path)
    back = load_dataset(f"csv:{tmp_path}")
    assert back.sha256() == ml100k.sha256()
    # 191 titles end in another year than the release date's: kept as they are.
    assert back.item_title == ml100k.item_title


def test_latest_small_counts(latest):
    assert (latest.n_users, latest.n_items, latest.n_ratings) == (610, 9742, 100_836)
    assert "(no genres listed)" not in latest.genres and "IMAX" in latest.genres
    assert len(latest.genres) == 19
    assert int((latest.item_genres.sum(1) == 0).sum()) == 34  # "(no genres listed)" films
    assert latest.rating_min == 0.5 and latest.rating.min() == 0.5 and latest.rating.max() == 5
    assert set(latest.user_country) == {DEFAULT_COUNTRY}
    assert np.isnan(latest.user_age).all() and set(latest.user_gender) == {None}


def test_latest_small_known_facts(latest):
    assert latest.item_title[0] == "Toy Story (1995)" and latest.item_ids[0] == "1"
    assert genres_of(latest, "1") == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert latest.item_year[0] == 1995
    assert latest.user_ids[:3] == ["1", "2", "3"]
    # First line of ratings.csv: 1,1,4.0,964982703
    assert (latest.rating_user[0], latest.rating_item[0]) == (0, 0)
    assert (latest.rating[0], latest.timestamp[0]) == (4.0, 964982703)
    years = latest.item_year[np.isfinite(latest.item_year)]
    assert years.min() >= 1900 and years.max() <= 2018
    assert np.isfinite(latest.item_year).mean() > 0.99


def test_latest_small_csv_round_trip(latest, tmp_path):
    write_csv(latest, tmp_path)
    back = load_dataset(f"csv:{tmp_path}")
    assert back.sha256() == latest.sha256()
    assert back.rating_min == 0.5

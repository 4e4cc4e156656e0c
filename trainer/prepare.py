"""Turns a :class:`~trainer.dataset.Dataset` and its split into model inputs.

Everything here is computed from the **training rows only**, so nothing
about a held-out rating leaks into the features the model sees. Feature
vectors come from the shared :mod:`recsys.features` functions; this module
only gathers the aggregates they need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from recsys.artifacts import aggregate_columns
from recsys.features import (
    FeatureSpec,
    UserProfile,
    item_feature_matrix,
    user_feature_matrix,
)
from trainer.dataset import DataError, Dataset


def build_spec(dataset: Dataset, train_rows: np.ndarray) -> FeatureSpec:
    """Vocabularies and constants for a dataset, with the global mean of the training rows."""
    if len(train_rows) == 0:
        raise DataError(f"dataset {dataset.name} ({dataset.source}) has no training ratings")
    years = dataset.item_year[np.isfinite(dataset.item_year) & (dataset.item_year > 0)]
    ages = np.asarray(dataset.user_age, np.float64)
    ages = ages[np.isfinite(ages) & (ages > 0)]
    return FeatureSpec(
        genres=tuple(dataset.genres),
        countries=tuple(sorted({c for c in dataset.user_country if c})),
        genders=tuple(sorted({g for g in dataset.user_gender if g})),
        occupations=tuple(sorted({o for o in dataset.user_occupation if o})),
        rating_min=float(dataset.rating_min),
        rating_max=float(dataset.rating_max),
        global_mean=float(np.mean(dataset.rating[train_rows], dtype=np.float64)),
        default_year=float(np.median(years)) if len(years) else 2000.0,
        default_age=float(np.round(np.median(ages))) if len(ages) else 0.0,  # whole years
    )


def user_aggregate_matrix(dataset: Dataset, rows: np.ndarray) -> np.ndarray:
    """float64 ``[n_users, 3 + 3G]`` aggregates over ``rows``, columns as ``aggregate_columns``.

    Every MovieLens-style interaction is a rating, so the watch and rated
    counts agree; they are separate columns because online interactions may
    be unrated.
    """
    n, g = dataset.n_users, len(dataset.genres)
    users = dataset.rating_user[rows]
    items = dataset.rating_item[rows]
    ratings = dataset.rating[rows].astype(np.float64)
    genres = dataset.item_genres[items].astype(np.float64)
    out = np.zeros((n, 3 + 3 * g), np.float64)
    out[:, 0] = np.bincount(users, minlength=n)
    out[:, 1] = out[:, 0]
    out[:, 2] = np.bincount(users, weights=ratings, minlength=n)
    for j in range(g):
        out[:, 3 + j] = np.bincount(users, weights=genres[:, j], minlength=n)
        out[:, 3 + 2 * g + j] = np.bincount(users, weights=genres[:, j] * ratings, minlength=n)
    out[:, 3 + g : 3 + 2 * g] = out[:, 3 : 3 + g]
    return out


def features_from_aggregates(
    spec: FeatureSpec,
    agg: np.ndarray,
    *,
    age: np.ndarray,
    gender: list[str | None],
    occupation: list[str | None],
    country: list[str | None],
) -> np.ndarray:
    """User feature matrix from an aggregate matrix (one row per user or per rating)."""
    g = len(spec.genres)
    return user_feature_matrix(
        spec,
        watch_count=agg[:, 0],
        rated_count=agg[:, 1],
        rating_sum=agg[:, 2],
        genre_watch=agg[:, 3 : 3 + g],
        genre_rated=agg[:, 3 + g : 3 + 2 * g],
        genre_sum=agg[:, 3 + 2 * g :],
        age=age,
        gender=gender,
        occupation=occupation,
        country=country,
    )


@dataclass
class Prepared:
    """A dataset, its split and the training-split aggregates and features."""

    dataset: Dataset
    train_rows: np.ndarray
    test_rows: np.ndarray
    spec: FeatureSpec
    user_agg: np.ndarray  # float64 [n_users, 3 + 3G]
    item_count: np.ndarray  # float64 [n_items] training ratings per item
    item_sum: np.ndarray  # float64 [n_items] training rating sum per item

    @cached_property
    def user_features(self) -> np.ndarray:
        """float32 ``[n_users, F_user]`` from the full training aggregates (what serving sees)."""
        d = self.dataset
        return features_from_aggregates(
            self.spec,
            self.user_agg,
            age=d.user_age,
            gender=d.user_gender,
            occupation=d.user_occupation,
            country=list(d.user_country),
        )

    @cached_property
    def item_features(self) -> np.ndarray:
        """float32 ``[n_items, F_item]`` from the training aggregates."""
        return item_feature_matrix(
            self.spec,
            genre_matrix=self.dataset.item_genres,
            year=self.dataset.item_year,
            rating_count=self.item_count,
            rating_sum=self.item_sum,
        )

    def row_features(
        self, rows: np.ndarray, *, leave_one_out: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """User and item inputs for rating ``rows``.

        With ``leave_one_out`` each row's own rating is taken out of its
        user's and item's aggregates first. A training rating then looks
        like a held-out one does at serving time (its rating is not yet in
        the features), so the model cannot learn to read the label back out
        of the user's or item's mean. A pair rated more than once in
        training (a rating from the interaction logs of a pair the data
        already has) has all its ratings taken out: the other would still
        give the label away.
        """
        d = self.dataset
        users = d.rating_user[rows]
        items = d.rating_item[rows]
        if not leave_one_out:
            return self.user_features[users], self.item_features[items]
        g = len(self.spec.genres)
        r = d.rating[rows].astype(np.float64)
        count, r_out = self._pair_totals(rows, r)
        gm = d.item_genres[items].astype(np.float64)
        agg = self.user_agg[users].copy()
        agg[:, 0:2] -= count[:, None]
        agg[:, 2] -= r_out
        agg[:, 3 : 3 + g] -= gm * count[:, None]
        agg[:, 3 + g : 3 + 2 * g] -= gm * count[:, None]
        agg[:, 3 + 2 * g :] -= gm * r_out[:, None]
        np.maximum(agg, 0.0, out=agg)  # guards float error on sums that should be 0
        uf = features_from_aggregates(
            self.spec,
            agg,
            age=d.user_age[users],
            gender=[d.user_gender[u] for u in users],
            occupation=[d.user_occupation[u] for u in users],
            country=[d.user_country[u] for u in users],
        )
        itf = item_feature_matrix(
            self.spec,
            genre_matrix=d.item_genres[items],
            year=d.item_year[items],
            rating_count=np.maximum(self.item_count[items] - count, 0.0),
            rating_sum=np.maximum(self.item_sum[items] - r_out, 0.0),
        )
        return uf, itf

    @cached_property
    def _repeated_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Training (user, item) pairs rated more than once: keys, counts, rating sums."""
        d = self.dataset
        keys = d.pair_keys(self.train_rows)
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        if len(uniq) == len(keys):
            return None  # the usual case: every pair once
        sums = np.bincount(inverse, weights=d.rating[self.train_rows].astype(np.float64))
        many = counts > 1
        return uniq[many], counts[many].astype(np.float64), sums[many]

    def _pair_totals(self, rows: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """How many ratings, and their sum, leave-one-out takes out for each of ``rows``."""
        count = np.ones(len(rows))
        repeated = self._repeated_pairs
        if repeated is None:
            return count, r
        keys, counts, sums = repeated
        own = self.dataset.pair_keys(rows)
        at = np.minimum(np.searchsorted(keys, own), len(keys) - 1)
        hit = keys[at] == own
        r_out = np.where(hit, sums[at], r)
        count[hit] = counts[at][hit]
        return count, r_out

    def profile(self, u: int) -> UserProfile:
        """Demographics of user row ``u``."""
        d = self.dataset
        age = float(d.user_age[u])
        return UserProfile(
            age=age if math.isfinite(age) else None,
            gender=d.user_gender[u],
            occupation=d.user_occupation[u],
            country=d.user_country[u],
        )

    @cached_property
    def histories(self) -> list[list[int]]:
        """Training item rows per user, oldest first (ties keep rating order)."""
        return self._histories(self.train_rows)

    @cached_property
    def watched(self) -> list[list[int]]:
        """Every rated item row per user (training and held-out), oldest first.

        What a publish seeds the watched set and recent list from: the
        held-out ratings are real interactions too, and leaving them out let
        the already-watched filter pass a fifth of what users had rated.
        """
        return self._histories(np.concatenate([self.train_rows, self.test_rows]))

    def _histories(self, rows: np.ndarray) -> list[list[int]]:
        d = self.dataset
        rows = np.asarray(rows, np.int64)
        rows = rows[np.lexsort((rows, d.timestamp[rows]))]
        users = d.rating_user[rows]
        order = np.argsort(users, kind="stable")
        users, items = users[order], d.rating_item[rows][order]
        bounds = np.searchsorted(users, np.arange(d.n_users + 1))
        return [items[bounds[u] : bounds[u + 1]].tolist() for u in range(d.n_users)]


def prepare(dataset: Dataset, train_rows: np.ndarray, test_rows: np.ndarray) -> Prepared:
    """Aggregates and features of ``dataset`` from its ``train_rows``."""
    train_rows = np.asarray(train_rows, np.int64)
    spec = build_spec(dataset, train_rows)
    if len(aggregate_columns(spec)) != 3 + 3 * len(spec.genres):
        raise AssertionError("aggregate layout changed; update trainer.prepare")
    items = dataset.rating_item[train_rows]
    return Prepared(
        dataset=dataset,
        train_rows=train_rows,
        test_rows=np.asarray(test_rows, np.int64),
        spec=spec,
        user_agg=user_aggregate_matrix(dataset, train_rows),
        item_count=np.bincount(items, minlength=dataset.n_items).astype(np.float64),
        item_sum=np.bincount(
            items, weights=dataset.rating[train_rows].astype(np.float64), minlength=dataset.n_items
        ),
    )

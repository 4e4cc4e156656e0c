"""The in-memory dataset every loader returns and the trainer consumes.

Columnar (numpy arrays and parallel lists) rather than one object per row,
so a 1M-item synthetic catalogue fits comfortably in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.checks import FieldError, check_id
from recsys.errors import UserFacingError
from recsys.features import UNKNOWN_COUNTRY


class DataError(UserFacingError):
    """Bad input data; the message names the file and, where it applies, the row."""


# The country bucket of a user the data gives none (trainer.loaders); the
# feature encoding's too, so serving treats a missing country alike.
DEFAULT_COUNTRY = UNKNOWN_COUNTRY

# The per-rating columns and their dtypes (what the ratings merged from the
# interaction logs consist of).
RATING_COLUMNS = {
    "rating_user": np.int32,
    "rating_item": np.int32,
    "rating": np.float32,
    "timestamp": np.int64,
}


@dataclass
class Dataset:
    """Ratings plus user and item side information.

    Row ``u`` of every ``user_*`` field describes user ``user_ids[u]``; row
    ``i`` of every ``item_*`` field describes item ``item_ids[i]``; ratings
    refer to those rows.
    """

    name: str  # "synthetic", "movielens-100k", "movielens-latest-small", "csv"
    source: str  # where it came from (path or generator spec), for the manifest
    genres: list[str]
    # users
    user_ids: list[str]
    user_age: np.ndarray  # float64 [n_users], NaN where unknown
    user_gender: list[str | None]
    user_occupation: list[str | None]
    user_country: list[str]
    # items
    item_ids: list[str]
    item_title: list[str]
    item_year: np.ndarray  # float64 [n_items], NaN where unknown
    item_genres: np.ndarray  # uint8 [n_items, G] multi-hot
    # ratings
    rating_user: np.ndarray  # int32 [n_ratings] user row
    rating_item: np.ndarray  # int32 [n_ratings] item row
    rating: np.ndarray  # float32 [n_ratings]
    timestamp: np.ndarray  # int64 [n_ratings] Unix seconds
    rating_min: float = 1.0
    rating_max: float = 5.0
    # The last this many ratings came from the services' interaction logs
    # (trainer.interactions): they always train, and the split of the rest is
    # the one the dataset alone gets.
    logged_rows: int = 0
    # The last this many users are known from those logs alone (users who
    # came after the data was collected): their side features are unknown.
    logged_users: int = 0

    @property
    def n_users(self) -> int:
        """Number of users."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of items."""
        return len(self.item_ids)

    @property
    def n_ratings(self) -> int:
        """Number of ratings."""
        return int(self.rating.shape[0])

    @property
    def n_own_users(self) -> int:
        """Users of the dataset itself: the first ones, before any ``logged_users``."""
        return self.n_users - self.logged_users

    @property
    def n_own_ratings(self) -> int:
        """Ratings of the dataset itself: the first ones, before any ``logged_rows``."""
        return self.n_ratings - self.logged_rows

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Random rating split: ``(train_rows, test_rows)``.

        Ratings are shuffled with ``numpy.random.default_rng(seed).permutation``
        and the first ``1 - test_fraction`` go to training. For MovieLens 100K
        with seed 0 this is exactly the split the reference figures use.
        Ratings merged from the interaction logs (``logged_rows``) are left
        out of the shuffle: the dataset's own split stays as it was. They
        train, except those of a (user, item) pair the split holds out,
        which are on neither side: trained on, the pair would be on both and
        the test set would score the model on a rating it learnt. Like the
        dataset's own held-out ratings, they are then in no published
        aggregates (publish replays only the ratings from the export's cutoff on).

        Raises:
            DataError: Either side would be empty (too few ratings for the
                fraction): the metrics of an empty test set are NaN.
        """
        n = self.n_own_ratings
        order = np.random.default_rng(seed).permutation(n)
        cut = round(n * (1.0 - test_fraction))
        if cut == 0 or cut == n:
            side = "training" if cut == 0 else "test"
            raise DataError(
                f"dataset {self.name} has {n} rating(s): a test_fraction of "
                f"{test_fraction} leaves the {side} split empty; add ratings or change "
                "trainer.test_fraction"
            )
        test = order[cut:]
        logged = np.arange(n, self.n_ratings, dtype=order.dtype)
        if self.logged_rows:
            logged = logged[~np.isin(self.pair_keys(logged), self.pair_keys(test))]
        return np.concatenate([order[:cut], logged]), test

    def pair_keys(self, rows: np.ndarray) -> np.ndarray:
        """One int64 per rating of ``rows``: its (user, item) pair."""
        return self.rating_user[rows].astype(np.int64) * self.n_items + self.rating_item[rows]

    def check_ids(self, max_bytes: int) -> None:
        """Raises DataError for a user or item id the services would refuse.

        The services refuse ids over their ``max_id_bytes`` or with a NUL in
        every request field; trained in, such an item was recommended but could
        never be recorded, and such a user could make no call at all.
        """
        for kind, ids in (("user", self.user_ids), ("item", self.item_ids)):
            for i, value in enumerate(ids):
                try:
                    check_id(value, f"{kind} id", max_bytes)
                except FieldError as exc:
                    raise DataError(
                        f"dataset {self.name}: {kind} id {value[:40]!r}"
                        f"{'…' if len(value) > 40 else ''} ({kind} {i + 1} of {len(ids)}) "
                        f"{exc.problem}; the services refuse it (max_id_bytes)"
                    ) from None

    def sha256(self) -> str:
        """Content hash (ids, side information and ratings) for the manifest.

        The ratings merged from the interaction logs (``logged_rows``) are
        left out: the held-out split depends on the rest alone, so versions
        trained on the same data with different exports share it
        (``recsys evaluate --compare``). :meth:`logged_sha256` is theirs.
        """
        h = hashlib.sha256()
        u = self.n_own_users
        for part in (self.genres, self.user_ids[:u], self.user_country[:u], self.item_ids):
            h.update("\x1f".join(part).encode())
            h.update(b"\x1e")
        people = self.user_gender[:u] + self.user_occupation[:u]
        h.update("\x1f".join(str(x) for x in people).encode())
        n = self.n_own_ratings
        for arr in (
            self.user_age[:u], self.item_year, self.item_genres,
            self.rating_user[:n], self.rating_item[:n], self.rating[:n], self.timestamp[:n],
        ):  # fmt: skip
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def logged(self) -> dict[str, np.ndarray]:
        """The ratings merged from the interaction logs, by column (``RATING_COLUMNS``)."""
        n = self.n_own_ratings
        return {name: getattr(self, name)[n:] for name in RATING_COLUMNS}

    def logged_user_ids(self) -> list[str]:
        """Ids of the users the interaction logs alone know, in their row order."""
        return self.user_ids[self.n_own_users :]

    def logged_sha256(self) -> str:
        """Content hash of the ratings merged from the interaction logs (of none: a constant).

        It covers the users those alone know too, when there are any (so a
        version trained before such users were added keeps its hash).
        """
        h = hashlib.sha256()
        for arr in self.logged().values():
            h.update(np.ascontiguousarray(arr).tobytes())
        if self.logged_users:
            h.update(b"\x1e" + "\x1f".join(self.logged_user_ids()).encode())
        return h.hexdigest()

    def with_logged(self, users: Sequence[str] = (), **columns: np.ndarray | list) -> Dataset:
        """This dataset's own ratings with ``columns`` as the merged ones (none: without any).

        Args:
            users: Ids of users the dataset lacks, appended after its own with
                unknown side features (rows ``n_own_users`` on); they replace
                the users merged before.
            columns: Every one of ``RATING_COLUMNS`` (user and item rows of
                this dataset, the appended users included), or nothing; they
                replace the ratings merged before.

        Raises:
            ValueError: Some columns missing, or of different lengths; a
                user row out of range; an appended user the dataset has.
        """
        if not columns and not users and not self.logged_rows and not self.logged_users:
            return self
        added = {name: np.asarray(columns.get(name, ()), t) for name, t in RATING_COLUMNS.items()}
        lengths = {len(a) for a in added.values()}
        if (columns and set(columns) != set(RATING_COLUMNS)) or len(lengths) != 1:
            raise ValueError(f"logged ratings take all of {sorted(RATING_COLUMNS)}, alike long")
        u, n = self.n_own_users, self.n_own_ratings
        users = [str(x) for x in users]
        if set(users) & set(self.user_ids[:u]) or len(set(users)) != len(users):
            raise ValueError("appended users must be new to the dataset and distinct")
        rows = added["rating_user"]
        if len(rows) and not (int(rows.min()) >= 0 and int(rows.max()) < u + len(users)):
            raise ValueError(f"a logged rating's user row is outside 0..{u + len(users) - 1}")
        k = len(users)
        # Unknown, as a loader leaves a user without side information: the
        # country is the data's bucket for an unknown one when it has that
        # bucket (a loader put its users there), else none at all, so no
        # country's top list counts them.
        country = DEFAULT_COUNTRY if DEFAULT_COUNTRY in self.user_country[:u] else ""
        return dataclasses.replace(
            self,
            user_ids=self.user_ids[:u] + users,
            user_age=np.concatenate([self.user_age[:u], np.full(k, np.nan)]),
            user_gender=self.user_gender[:u] + [None] * k,
            user_occupation=self.user_occupation[:u] + [None] * k,
            user_country=self.user_country[:u] + [country] * k,
            logged_users=k,
            **{name: np.concatenate([getattr(self, name)[:n], a]) for name, a in added.items()},
            logged_rows=len(added["rating"]),
        )

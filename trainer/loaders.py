"""Dataset loaders: one ``--data`` spec string in, a :class:`Dataset` out.

Specs (also listed in ``recsys.cli.DATA_HELP``):

* ``synthetic`` or ``synthetic:users=2000,items=1500,ratings=100000,countries=6,seed=0``
  (any subset of the keys) runs :func:`trainer.synthetic.generate`.
* ``movielens-100k:<dir>``: ``u.data`` (tab-separated user, item, rating,
  timestamp), ``u.item`` (``|``-separated id, title, release date, video date,
  URL, then one 0/1 flag per genre), ``u.user`` (id, age, gender, occupation,
  ZIP) and ``u.genre`` (name, index). The year comes from the release date
  (else from the title); the "country" is the ZIP's region
  (:mod:`trainer.regions`). The "unknown" genre is kept.
* ``movielens-latest-small:<dir>``: ``ratings.csv`` (userId, movieId, rating,
  timestamp; half stars 0.5-5) and ``movies.csv`` (movieId, title, genres with
  ``|`` between them). No demographics: every user is in
  :data:`DEFAULT_COUNTRY`; the year is parsed from a title ending in ``(1995)``;
  ``(no genres listed)`` means no genre. Users are numbered in order of first
  appearance in ``ratings.csv``; genres are sorted by name.
* ``csv:<dir>``: the project's own format, as :func:`trainer.synthetic.write_csv`
  writes it: the latest-small layout plus an optional ``users.csv`` (userId,
  age, gender, occupation, country; empty cells mean unknown) and an optional
  ``genres.txt`` (the genre vocabulary in column order, one per line). Ratings
  may be half stars; ``rating_min`` is 0.5 only when some rating is below 1.

Ratings keep file order (``Dataset.split`` depends on it). Anything wrong with
a file raises :class:`~trainer.dataset.DataError` naming the file and the
first bad line (1-based, header included): a missing file, a wrong column
count, a non-numeric field, a rating out of range, an id not defined in the
users or items file, a duplicate id or (user, item) pair, or no data at all.
Checks are vectorised over columns, so 100K ratings load in a fraction of a
second.
"""

from __future__ import annotations

import csv
import gc
import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from operator import methodcaller
from pathlib import Path

import numpy as np
from numpy.dtypes import StringDType

from trainer.dataset import DEFAULT_COUNTRY as DEFAULT_COUNTRY  # its home: users without one
from trainer.dataset import DataError, Dataset
from trainer.regions import region_for_postal_code

ML100K_FILES = ("u.data", "u.item", "u.user", "u.genre")
NO_GENRES = "(no genres listed)"
SPEC_KINDS = ("synthetic", "movielens-100k", "movielens-latest-small", "csv")
_SYNTHETIC_KEYS = {
    "users": "n_users",
    "items": "n_items",
    "ratings": "n_ratings",
    "countries": "n_countries",
    "seed": "seed",
}
_STR = StringDType()


def load_dataset(spec: str) -> Dataset:
    """Loads the dataset a ``--data`` spec names.

    Args:
        spec: ``synthetic[:key=value,...]``, ``movielens-100k:<dir>``,
            ``movielens-latest-small:<dir>`` or ``csv:<dir>`` (see the module
            docstring).

    Returns:
        The dataset, with ``source`` set to the spec (directories resolved).

    Raises:
        DataError: An unknown spec, or a missing or malformed file (the
            message names the file and line).
    """
    kind, _, arg = spec.strip().partition(":")
    if kind == "synthetic":
        return _load_synthetic(arg)
    if kind not in SPEC_KINDS:
        raise DataError(
            f"unknown dataset spec {spec!r}: expected 'synthetic[:users=..,items=..,ratings=..,"
            "countries=..,seed=..]', 'movielens-100k:<dir>', 'movielens-latest-small:<dir>' "
            "or 'csv:<dir>'"
        )
    if not arg:
        raise DataError(f"dataset spec {spec!r} needs a directory: '{kind}:<dir>'")
    directory = Path(arg).expanduser()
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (from dataset spec {spec!r})")
    if kind == "movielens-100k":
        return load_movielens_100k(directory)
    if kind == "movielens-latest-small":
        return load_movielens_latest_small(directory)
    return load_csv(directory)


def _load_synthetic(arg: str) -> Dataset:
    from trainer import synthetic  # keeps numpy-only imports light for the file loaders

    kwargs: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in _SYNTHETIC_KEYS:
            raise DataError(
                f"synthetic dataset spec: bad entry {part!r}; expected key=value with key one "
                f"of {', '.join(_SYNTHETIC_KEYS)}"
            )
        try:
            kwargs[_SYNTHETIC_KEYS[key]] = int(value.strip().replace("_", ""))
        except ValueError:
            raise DataError(f"synthetic dataset spec: {key}={value!r} is not an integer") from None
    try:
        return synthetic.generate(**kwargs)
    except ValueError as exc:
        raise DataError(f"synthetic dataset spec: {exc}") from None


# --- reading files ----------------------------------------------------------------------


@dataclass
class _Table:
    """Columns of one file, with the 1-based line number each data row started on."""

    path: Path
    columns: list[list[str]]
    lines: Sequence[int]  # a range when every row is one line

    def __len__(self) -> int:
        return len(self.lines)

    def error(self, row: int, message: str) -> DataError:
        """A DataError for data row ``row`` (0-based)."""
        return DataError(f"{self.path}, line {self.lines[row]}: {message}")

    def column(self, k: int) -> list[str]:
        return self.columns[k]


def _read(
    path: Path,
    names: Sequence[str],
    *,
    delimiter: str = ",",
    header: bool = False,
    encoding: str = "utf-8",
    quoting: int = csv.QUOTE_MINIMAL,
) -> _Table:
    """Reads a delimited file with columns ``names``, skipping blank lines.

    With ``header``, the first row must be ``names``. Every row must have
    ``len(names)`` fields. Files without quoting are split as plain text (no
    per-row list objects: several times faster and leaner for millions of
    rows); others go through the ``csv`` module.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if encoding == UTF8_OR_LATIN1:
            text = _utf8_or_latin1(path.read_bytes())
        else:
            with open(path, encoding=encoding, newline="") as f:
                text = f.read()
    except UnicodeDecodeError as exc:
        line = _line_of_byte(path, exc, encoding)
        raise DataError(f"{path}, line {line}: not {encoding} text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    text = text.removeprefix("\ufeff")
    plain = "\r" not in text and (quoting == csv.QUOTE_NONE or '"' not in text)
    with _gc_paused():
        if plain:
            all_lines, line_no, fields = _split_plain(text, delimiter)
        else:
            all_lines, line_no, fields = _split_csv(path, text, delimiter, quoting)
    n = len(names)
    if header:
        if not all_lines:
            raise DataError(f"{path}: empty file (expected a header {','.join(names)})")
        got = [c.strip() for c in all_lines[0]]
        if got != list(names):
            raise DataError(
                f"{path}, line {line_no[0]}: expected the header {','.join(names)}, "
                f"got {delimiter.join(all_lines[0])}"
            )
    start = 1 if header else 0
    counts = fields[start:]
    bad = np.flatnonzero(counts != n)
    if bad.size:
        r = int(bad[0]) + start
        raise DataError(
            f"{path}, line {line_no[r]}: expected {n} columns ({', '.join(names)}), "
            f"got {counts[bad[0]]}"
        )
    rows = all_lines[start:]
    with _gc_paused():
        if isinstance(rows, _FlatRows):
            columns = rows.columns(n)
        else:
            columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in names]
    return _Table(path, columns, line_no[start:])


class _FlatRows:
    """Lines of a quote-free file kept as strings; split into columns in one go."""

    def __init__(self, lines: list[str], delimiter: str):
        self.lines = lines
        self.delimiter = delimiter

    def __len__(self) -> int:
        return len(self.lines)

    def __bool__(self) -> bool:
        return bool(self.lines)

    def __getitem__(self, k):  # int -> fields of one line; slice -> _FlatRows
        if isinstance(k, slice):
            return _FlatRows(self.lines[k], self.delimiter)
        return self.lines[k].split(self.delimiter)

    def columns(self, n: int) -> list[list[str]]:
        if not self.lines:
            return [[] for _ in range(n)]
        flat = self.delimiter.join(self.lines).split(self.delimiter)
        return [flat[k::n] for k in range(n)]


# MovieLens 100K ships in Latin-1, but a copy re-saved by an editor or a
# converter is UTF-8 (with a BOM, sometimes): decoded as Latin-1 its titles
# came out garbled and a BOM became part of the first id.
UTF8_OR_LATIN1 = "utf-8, else latin-1"


def _utf8_or_latin1(data: bytes) -> str:
    """The file as UTF-8 (BOM dropped) when it decodes as such, else as Latin-1."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _split_plain(text: str, delimiter: str) -> tuple[_FlatRows, Sequence[int], np.ndarray]:
    """Lines (blank ones dropped), their 1-based numbers and field counts."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    line_no: Sequence[int] = range(1, len(lines) + 1)
    counts = np.fromiter(map(methodcaller("count", delimiter), lines), np.int64, len(lines)) + 1
    # Blank lines (spaces only, too) have no delimiter: only those few are stripped.
    lone = np.flatnonzero(counts == 1)
    blank = [i for i in lone.tolist() if not lines[i].strip()]
    if blank:
        keep = np.ones(len(lines), bool)
        keep[blank] = False
        kept = np.flatnonzero(keep)
        lines = [lines[i] for i in kept]
        line_no = (kept + 1).tolist()
        counts = counts[kept]
    return _FlatRows(lines, delimiter), line_no, counts


def _split_csv(
    path: Path, text: str, delimiter: str, quoting: int
) -> tuple[list[list[str]], list[int], np.ndarray]:
    """Rows parsed by the ``csv`` module, with the line each starts on."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting,
                        strict=True)  # fmt: skip
    rows: list[list[str]] = []
    line_no: list[int] = []
    start = 1
    try:
        for row in reader:
            if row and (len(row) > 1 or row[0].strip()):  # blank, or spaces only: skipped
                rows.append(row)
                line_no.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: {exc}") from None
    return rows, line_no, np.fromiter(map(len, rows), np.int64, len(rows))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pauses the cyclic GC: millions of new lists would trigger it over and over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _line_of_byte(path: Path, exc: UnicodeDecodeError, encoding: str) -> int:
    """Line of the first byte that does not decode (the error's offset is per chunk)."""
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as full:
        return data[: full.start].count(b"\n") + 1
    return 1


def _numbers(table: _Table, values: list[str], name: str, dtype: type) -> np.ndarray:
    """Parses a column as numbers; a bad value raises naming its line."""
    try:
        return np.array(values, dtype=dtype)
    except (ValueError, OverflowError):
        pass
    for r, v in enumerate(values):  # slow path only to find the culprit
        try:
            np.array([v], dtype=dtype)
        except (ValueError, OverflowError):
            kind = "an integer" if dtype is np.int64 else "a number"
            raise table.error(r, f"{name} {v!r} is not {kind}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _header_cells(path: Path) -> list[str] | None:
    """The first non-blank line's cells (CSV quoting undone), as _read reads a header.

    None when the file cannot be read (_read then says why).
    """
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            line = ""
            for i, raw in enumerate(f):
                line = raw.removeprefix("\ufeff") if i == 0 else raw
                if line.strip():  # _read skips blank lines before the header too
                    break
    except OSError:
        return None
    return [c.strip() for c in next(csv.reader([line]), [])]


def _optional_numbers(table: _Table, values: list[str], name: str) -> np.ndarray:
    """Float column where an empty cell means unknown (NaN)."""
    arr = np.asarray(values, dtype=_STR)
    arr = np.strings.strip(arr)
    empty = arr == ""
    out = np.full(arr.shape[0], np.nan)
    if (~empty).any():
        idx = np.flatnonzero(~empty)
        out[idx] = _numbers(_Table(table.path, [], [table.lines[i] for i in idx]),
                            arr[idx].tolist(), name, np.float64)  # fmt: skip
    bad = np.flatnonzero(~empty & ~(np.isfinite(out) & (out >= 0)))
    if bad.size:
        raise table.error(int(bad[0]), f"{name} {values[bad[0]]!r} is not a non-negative number")
    return out


def _unique_ids(table: _Table, values: list[str], what: str) -> dict[str, int]:
    """``id -> row``; empty or duplicate ids raise naming the line."""
    index = dict(zip(values, range(len(values)), strict=True))
    if "" in index:
        raise table.error(values.index(""), f"empty {what}")
    if len(index) != len(values):
        first: dict[str, int] = {}
        for r, v in enumerate(values):  # error path only
            f = first.setdefault(v, r)
            if f != r:
                raise table.error(r, f"duplicate {what} {v!r} (first on line {table.lines[f]})")
    return index


def _map_ids(
    table: _Table, values: list[str], index: dict[str, int], what: str, where: str
) -> np.ndarray:
    """Maps id strings to rows of ``index``; an unknown id raises naming the line."""
    rows = np.fromiter(map(index.get, values, repeat(-1)), np.int64, len(values))
    bad = np.flatnonzero(rows < 0)
    if bad.size:
        r = int(bad[0])
        raise table.error(r, f"unknown {what} {values[r]!r} (not in {where})")
    return rows.astype(np.int32)


def _first_seen_ids(values: list[str]) -> tuple[list[str], np.ndarray]:
    """Ids in order of first appearance, and each value's row in that order."""
    ids = list(dict.fromkeys(values))
    index = dict(zip(ids, range(len(ids)), strict=True))
    rows = np.fromiter(map(index.__getitem__, values), np.int64, len(values))
    return ids, rows.astype(np.int32)


def _ratings(
    table: _Table,
    *,
    user_col: list[str],
    item_col: list[str],
    rating_col: list[str],
    ts_col: list[str],
    user_index: dict[str, int] | None,
    item_index: dict[str, int],
    users_where: str,
    items_where: str,
    rating_range: tuple[float, float],
) -> tuple[list[str] | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parses and checks rating columns: ``(new_user_ids, user, item, rating, timestamp)``.

    With ``user_index`` None, users are defined by the ratings themselves and
    their ids (in order of first appearance) are returned first.
    """
    if not table:
        raise DataError(f"{table.path}: no ratings")
    if user_index is None:
        user_ids, users = _first_seen_ids(user_col)
        if "" in user_ids:
            raise table.error(list(user_col).index(""), "empty user id")
    else:
        user_ids, users = None, _map_ids(table, user_col, user_index, "user id", users_where)
    items = _map_ids(table, item_col, item_index, "item id", items_where)
    rating = _numbers(table, rating_col, "rating", np.float64)
    lo, hi = rating_range
    bad = np.flatnonzero(~((rating >= lo) & (rating <= hi)))  # also catches NaN
    if bad.size:
        r = int(bad[0])
        raise table.error(r, f"rating {rating_col[r]!r} is outside {lo:g}..{hi:g}")
    ts = _numbers(table, ts_col, "timestamp", np.int64)
    n_items = max(len(item_index), 1)
    pair = users.astype(np.int64) * n_items + items
    ordered = np.sort(pair)
    if (ordered[1:] == ordered[:-1]).any():
        order = np.argsort(pair, kind="stable")  # error path: find the first repeat
        dup = np.flatnonzero(pair[order][1:] == pair[order][:-1])
        later = order[dup + 1]
        k = int(np.argmin(later))
        r, first = int(later[k]), int(order[dup[k]])
        raise table.error(
            r, f"duplicate rating of item {item_col[r]!r} by user {user_col[r]!r} "
            f"(first on line {table.lines[first]})"
        )  # fmt: skip
    return user_ids, users, items, rating.astype(np.float32), ts


def _year_from_titles(titles: list[str]) -> np.ndarray:
    """Release year from titles ending in ``(1995)``; NaN where there is none."""
    if not titles:
        return np.zeros(0)
    s = np.strings.rstrip(np.asarray(titles, dtype=_STR))
    tail = np.strings.slice(s, -6, None)
    digits = np.strings.slice(tail, 1, 5)
    ok = (
        (np.strings.str_len(tail) == 6)
        & np.strings.startswith(tail, "(")
        & np.strings.endswith(tail, ")")
        & np.strings.isdecimal(digits)
    )
    out = np.full(s.shape[0], np.nan)
    if ok.any():
        out[ok] = digits[ok].astype(np.float64)
    return out


def _genre_matrix(
    table: _Table, genre_col: list[str], vocabulary: list[str] | None
) -> tuple[list[str], np.ndarray]:
    """Multi-hot genres from ``A|B|C`` cells; work is per distinct cell, not per row."""
    cells = list(dict.fromkeys(genre_col))
    cell_index = dict(zip(cells, range(len(cells)), strict=True))
    inverse = np.fromiter(map(cell_index.__getitem__, genre_col), np.int64, len(genre_col))
    combos = [
        [g.strip() for g in cell.split("|") if g.strip() and g.strip() != NO_GENRES]
        for cell in cells
    ]
    if vocabulary is None:
        vocabulary = sorted({g for c in combos for g in c})
        if not vocabulary:
            raise DataError(f"{table.path}: no item has a genre")
    index = {g: k for k, g in enumerate(vocabulary)}
    hot = np.zeros((len(combos), len(vocabulary)), np.uint8)
    for k, combo in enumerate(combos):
        for g in combo:
            col = index.get(g)
            if col is None:
                r = int(np.flatnonzero(inverse == k)[0])
                raise table.error(r, f"genre {g!r} is not in genres.txt")
            hot[k, col] = 1
    return vocabulary, hot[inverse]


# --- MovieLens 100K ---------------------------------------------------------------------


def load_movielens_100k(directory: str | Path) -> Dataset:
    """Loads MovieLens 100K (``u.data``, ``u.item``, ``u.user``, ``u.genre``).

    Args:
        directory: The unpacked ``ml-100k`` directory.

    Returns:
        943 users, 1682 items, 19 genres (with "unknown") and 100,000 ratings
        for the official release; countries are ZIP regions.

    Raises:
        DataError: A missing or malformed file, naming the file and line.
    """
    d = Path(directory)
    for name in ML100K_FILES:
        if not (d / name).is_file():
            raise DataError(
                f"{d / name}: file not found (MovieLens 100K needs {', '.join(ML100K_FILES)})"
            )
    # The official files are Latin-1 (a few titles have accents).
    read = dict(delimiter="|", encoding=UTF8_OR_LATIN1, quoting=csv.QUOTE_NONE)

    gt = _read(d / "u.genre", ("name", "index"), **read)  # type: ignore[arg-type]
    genre_pos = _numbers(gt, gt.column(1), "genre index", np.int64)
    bad = np.flatnonzero(genre_pos != np.arange(len(gt)))
    if bad.size:
        raise gt.error(int(bad[0]), f"genre index {genre_pos[bad[0]]} should be {bad[0]}")
    genres = gt.column(0)
    if not genres:
        raise DataError(f"{gt.path}: no genres")
    _unique_ids(gt, genres, "genre")

    item_names = ("id", "title", "release date", "video date", "URL", *genres)
    it = _read(d / "u.item", item_names, **read)  # type: ignore[arg-type]
    if not it:
        raise DataError(f"{it.path}: no items")
    item_ids = it.column(0)
    item_index = _unique_ids(it, item_ids, "item id")
    flags = np.asarray(it.columns[5:], dtype=_STR).T
    bad = np.argwhere((flags != "0") & (flags != "1"))
    if bad.size:
        r, k = (int(x) for x in bad[0])
        raise it.error(r, f"genre flag {genres[k]!r} is {flags[r, k]!r}, expected 0 or 1")
    item_genres = (flags == "1").astype(np.uint8)
    titles = it.column(1)
    release = np.strings.strip(np.asarray(it.column(2), dtype=_STR))
    year = np.full(len(titles), np.nan)
    has = release != ""
    tail = np.strings.slice(release, -4, None)
    # "01-Jan-1995", though a few have a one-digit day ("4-Feb-1971").
    well_formed = (np.strings.slice(release, -5, -4) == "-") & np.strings.isdecimal(tail)
    bad = np.flatnonzero(has & ~well_formed)
    if bad.size:
        r = int(bad[0])
        raise it.error(r, f"release date {it.column(2)[r]!r} is not like 01-Jan-1995")
    year[has] = tail[has].astype(np.float64)
    from_title = _year_from_titles(titles)
    year = np.where(np.isnan(year), from_title, year)

    user_names = ("id", "age", "gender", "occupation", "zip code")
    ut = _read(d / "u.user", user_names, **read)  # type: ignore[arg-type]
    if not ut:
        raise DataError(f"{ut.path}: no users")
    user_ids = ut.column(0)
    user_index = _unique_ids(ut, user_ids, "user id")
    age = _optional_numbers(ut, ut.column(1), "age")
    gender = [x.strip() or None for x in ut.column(2)]
    occupation = [x.strip() or None for x in ut.column(3)]
    country = [region_for_postal_code(z) for z in ut.column(4)]

    rating_names = ("user id", "item id", "rating", "timestamp")
    rt = _read(d / "u.data", rating_names, delimiter="\t", encoding=UTF8_OR_LATIN1,
               quoting=csv.QUOTE_NONE)  # fmt: skip
    _, users, items, rating, ts = _ratings(
        rt,
        user_col=rt.column(0),
        item_col=rt.column(1),
        rating_col=rt.column(2),
        ts_col=rt.column(3),
        user_index=user_index,
        item_index=item_index,
        users_where="u.user",
        items_where="u.item",
        rating_range=(1.0, 5.0),
    )
    return Dataset(
        name="movielens-100k",
        source=f"movielens-100k:{d.resolve()}",
        genres=genres,
        user_ids=user_ids,
        user_age=age,
        user_gender=gender,
        user_occupation=occupation,
        user_country=country,
        item_ids=item_ids,
        item_title=titles,
        item_year=year,
        item_genres=item_genres,
        rating_user=users,
        rating_item=items,
        rating=rating,
        timestamp=ts,
        rating_min=1.0,
        rating_max=5.0,
    )


# --- latest-small layout and the project's CSV format ---------------------------------

RATINGS_HEADER = ("userId", "movieId", "rating", "timestamp")
MOVIES_HEADER = ("movieId", "title", "genres")
# The project's own movies.csv adds the release year: a title may end in
# another year than the release date's (MovieLens 100K), and a year appended
# to it would change the title.
MOVIES_YEAR_HEADER = (*MOVIES_HEADER, "year")
USERS_HEADER = ("userId", "age", "gender", "occupation", "country")


def load_movielens_latest_small(directory: str | Path) -> Dataset:
    """Loads MovieLens latest-small (``ratings.csv`` and ``movies.csv``).

    Args:
        directory: The unpacked ``ml-latest-small`` directory.

    Returns:
        610 users, 9742 movies and 100,836 half-star ratings for the 2018
        release; no demographics, every user in :data:`DEFAULT_COUNTRY`.

    Raises:
        DataError: A missing or malformed file, naming the file and line.
    """
    return _load_latest_layout(Path(directory), "movielens-latest-small", extras=False)


def load_csv(directory: str | Path) -> Dataset:
    """Loads the project's CSV format (what ``recsys generate-data`` writes).

    Args:
        directory: Holds ``ratings.csv`` and ``movies.csv``, and optionally
            ``users.csv`` and ``genres.txt``.

    Returns:
        The dataset; with ``users.csv`` users come in its order and ratings
        must name only its users.

    Raises:
        DataError: A missing or malformed file, naming the file and line.
    """
    return _load_latest_layout(Path(directory), "csv", extras=True)


def _load_latest_layout(d: Path, name: str, *, extras: bool) -> Dataset:
    vocabulary = None
    if extras and (d / "genres.txt").is_file():
        gt = _read(d / "genres.txt", ("genre",), delimiter="\t", quoting=csv.QUOTE_NONE)
        vocabulary = [g.strip() for g in gt.column(0)]
        if not vocabulary:
            raise DataError(f"{gt.path}: no genres")
        _unique_ids(gt, vocabulary, "genre")

    movies_header = MOVIES_HEADER
    if extras and _header_cells(d / "movies.csv") == list(MOVIES_YEAR_HEADER):
        movies_header = MOVIES_YEAR_HEADER
    mt = _read(d / "movies.csv", movies_header, header=True)
    if not mt:
        raise DataError(f"{mt.path}: no movies")
    item_ids = list(map(str.strip, mt.column(0)))
    item_index = _unique_ids(mt, item_ids, "movieId")
    titles = mt.column(1)
    if movies_header is MOVIES_YEAR_HEADER:
        year = _optional_numbers(mt, mt.column(3), "year")
    else:
        year = _year_from_titles(titles)
    genres, item_genres = _genre_matrix(mt, mt.column(2), vocabulary)

    user_index = None
    user_ids: list[str] | None = None
    age = gender = occupation = country = None
    if extras and (d / "users.csv").is_file():
        ut = _read(d / "users.csv", USERS_HEADER, header=True)
        if not ut:
            raise DataError(f"{ut.path}: no users")
        user_ids = list(map(str.strip, ut.column(0)))
        user_index = _unique_ids(ut, user_ids, "userId")
        age = _optional_numbers(ut, ut.column(1), "age")
        gender = [x.strip() or None for x in ut.column(2)]
        occupation = [x.strip() or None for x in ut.column(3)]
        country = [x.strip() or DEFAULT_COUNTRY for x in ut.column(4)]

    rt = _read(d / "ratings.csv", RATINGS_HEADER, header=True)
    seen_ids, users, items, rating, ts = _ratings(
        rt,
        user_col=list(map(str.strip, rt.column(0))),
        item_col=list(map(str.strip, rt.column(1))),
        rating_col=rt.column(2),
        ts_col=rt.column(3),
        user_index=user_index,
        item_index=item_index,
        users_where="users.csv",
        items_where="movies.csv",
        rating_range=(0.5, 5.0),
    )
    if user_ids is None:
        assert seen_ids is not None
        user_ids = seen_ids
        n = len(user_ids)
        age = np.full(n, np.nan)
        gender = [None] * n
        occupation = [None] * n
        country = [DEFAULT_COUNTRY] * n
    # MovieLens latest uses half stars from 0.5; our own CSVs keep 1-5 unless they go below.
    half_scale = name != "csv" or float(rating.min()) < 1.0
    assert age is not None and gender is not None and occupation is not None
    assert country is not None
    return Dataset(
        name=name,
        source=f"{name}:{d.resolve()}",
        genres=genres,
        user_ids=user_ids,
        user_age=age,
        user_gender=gender,
        user_occupation=occupation,
        user_country=country,
        item_ids=item_ids,
        item_title=titles,
        item_year=year,
        item_genres=item_genres,
        rating_user=users,
        rating_item=items,
        rating=rating,
        timestamp=ts,
        rating_min=0.5 if half_scale else 1.0,
        rating_max=5.0,
    )


def describe(dataset: Dataset) -> str:
    """One line summarising a dataset (for logs and the CLI)."""
    years = dataset.item_year[np.isfinite(dataset.item_year)]
    span = f"{int(years.min())}-{int(years.max())}" if years.size else "unknown years"
    mean = float(dataset.rating.mean()) if dataset.n_ratings else math.nan
    return (
        f"{dataset.name}: {dataset.n_users} users, {dataset.n_items} items, "
        f"{dataset.n_ratings} ratings (mean {mean:.2f}), {len(dataset.genres)} genres, "
        f"{len(set(dataset.user_country))} countries, {span}"
    )

"""Loaders on small hand-written files: parsing, and a clear error for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.errors import UserFacingError
from trainer.dataset import DataError
from trainer.loaders import DEFAULT_COUNTRY, load_dataset
from trainer.regions import REGIONS, region_for_postal_code

# --- regions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, region",
    [
        ("02139", "us-northeast"),  # Cambridge MA
        ("10025", "us-northeast"),  # New York
        ("20009", "us-southeast"),  # Washington DC
        ("30303", "us-southeast"),  # Atlanta
        ("48104", "us-midwest"),  # Ann Arbor
        ("55414", "us-midwest"),  # Minneapolis
        ("60615", "us-midwest"),  # Chicago
        ("77005", "us-south"),  # Houston
        ("85711", "us-mountain"),  # Tucson
        ("94043", "us-west"),  # Mountain View
        ("94043-1351", "us-west"),  # ZIP+4
        (" 98101 ", "us-west"),
        ("T8H1N", "ca"),  # truncated Canadian codes, as in MovieLens 100K
        ("k1a 0b1", "ca"),
        ("V3N4P", "ca"),
        ("D1A2B", "other"),  # D is not a Canadian first letter
        ("1234", "other"),
        ("123456", "other"),
        ("SW1A 1AA", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_region_for_postal_code(code, region):
    assert region_for_postal_code(code) == region
    assert region in REGIONS


def test_regions_cover_every_first_digit():
    got = {region_for_postal_code(f"{d}0000") for d in range(10)}
    assert got == set(REGIONS) - {"ca", "other"}


# --- small valid inputs -----------------------------------------------------------------

RATINGS = (
    "userId,movieId,rating,timestamp\n1,10,4.0,100\n1,20,3.5,101\n2,10,5.0,102\n3,30,0.5,103\n"
)
MOVIES = (
    "movieId,title,genres\n"
    "10,Toy Story (1995),Animation|Comedy\n"
    '20,"Pirates, Ahoy (2001)",Adventure\n'
    "30,Untitled,(no genres listed)\n"
)
USERS = "userId,age,gender,occupation,country\n1,31,F,writer,de\n2,,,,\n3,45.5,M,artist,jp\n"


def csv_dir(tmp_path: Path, **overrides: str | None) -> Path:
    files = {"ratings.csv": RATINGS, "movies.csv": MOVIES, "users.csv": USERS}
    files.update(overrides)
    d = tmp_path / "data"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if text is not None:
            (d / name).write_text(text, encoding="utf-8")
    return d


def test_csv_layout_parses(tmp_path):
    ds = load_dataset(f"csv:{csv_dir(tmp_path)}")
    assert ds.name == "csv"
    assert ds.genres == ["Adventure", "Animation", "Comedy"]
    assert ds.item_ids == ["10", "20", "30"]
    assert ds.item_title[1] == "Pirates, Ahoy (2001)"
    np.testing.assert_array_equal(ds.item_year, [1995, 2001, np.nan])
    np.testing.assert_array_equal(ds.item_genres, [[0, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert ds.user_ids == ["1", "2", "3"]
    np.testing.assert_array_equal(ds.user_age, [31, np.nan, 45.5])
    assert ds.user_gender == ["F", None, "M"]
    assert ds.user_occupation == ["writer", None, "artist"]
    assert ds.user_country == ["de", DEFAULT_COUNTRY, "jp"]
    np.testing.assert_array_equal(ds.rating_user, [0, 0, 1, 2])
    np.testing.assert_array_equal(ds.rating_item, [0, 1, 0, 2])
    np.testing.assert_array_equal(ds.rating, np.array([4.0, 3.5, 5.0, 0.5], np.float32))
    np.testing.assert_array_equal(ds.timestamp, [100, 101, 102, 103])
    assert ds.rating_min == 0.5


def test_csv_without_users_file_numbers_users_by_first_rating(tmp_path):
    ratings = "userId,movieId,rating,timestamp\n7,10,4,1\n3,20,2,2\n7,20,5,3\n"
    ds = load_dataset(f"csv:{csv_dir(tmp_path, **{'users.csv': None, 'ratings.csv': ratings})}")
    assert ds.user_ids == ["7", "3"]
    np.testing.assert_array_equal(ds.rating_user, [0, 1, 0])
    assert ds.user_country == [DEFAULT_COUNTRY] * 2 and ds.user_gender == [None, None]
    assert np.isnan(ds.user_age).all()
    assert ds.rating_min == 1.0


def test_latest_small_layout_ignores_extras_and_uses_half_stars(tmp_path):
    d = csv_dir(tmp_path, **{"ratings.csv": "userId,movieId,rating,timestamp\n5,10,4,1\n"})
    ds = load_dataset(f"movielens-latest-small:{d}")
    assert ds.name == "movielens-latest-small"
    assert ds.user_ids == ["5"] and ds.user_country == [DEFAULT_COUNTRY]  # users.csv not read
    assert ds.rating_min == 0.5


def test_an_empty_user_id_in_the_ratings_is_refused_naming_its_line(tmp_path):
    """Without users.csv the ratings define the users: "" must not become one."""
    ratings = "userId,movieId,rating,timestamp\n5,10,4,1\n,10,3,2\n"
    d = csv_dir(tmp_path, **{"ratings.csv": ratings})
    with pytest.raises(DataError, match=r"ratings\.csv, line 3: empty user id"):
        load_dataset(f"movielens-latest-small:{d}")


def test_blank_lines_are_skipped_and_do_not_shift_line_numbers(tmp_path):
    ratings = "userId,movieId,rating,timestamp\n1,10,4,1\n\n2,10,4,2\n3,30,nine,3\n"
    with pytest.raises(DataError, match=r"ratings\.csv, line 5: rating 'nine' is not a number"):
        load_dataset(f"csv:{csv_dir(tmp_path, **{'ratings.csv': ratings})}")


# --- the project's CSV format: every kind of bad input -----------------------------------

HEAD_R = "userId,movieId,rating,timestamp\n"
HEAD_M = "movieId,title,genres\n"
HEAD_U = "userId,age,gender,occupation,country\n"


@pytest.mark.parametrize(
    "overrides, file, line, message",
    [
        ({"ratings.csv": None}, "ratings.csv", None, "file not found"),
        ({"movies.csv": None}, "movies.csv", None, "file not found"),
        ({"ratings.csv": ""}, "ratings.csv", None, "empty file"),
        ({"ratings.csv": HEAD_R}, "ratings.csv", None, "no ratings"),
        ({"movies.csv": HEAD_M}, "movies.csv", None, "no movies"),
        ({"users.csv": HEAD_U}, "users.csv", None, "no users"),
        ({"ratings.csv": "user,movie,rating,timestamp\n1,10,4,1\n"}, "ratings.csv", 1,
         "expected the header userId,movieId,rating,timestamp"),
        ({"ratings.csv": HEAD_R + "1,10,4,1\n2,10,4\n"}, "ratings.csv", 3,
         "expected 4 columns (userId, movieId, rating, timestamp), got 3"),
        ({"ratings.csv": HEAD_R + "1,10,4,1,9\n"}, "ratings.csv", 2, "expected 4 columns"),
        ({"ratings.csv": HEAD_R + "1,10,4,1\n2,10,four,2\n"}, "ratings.csv", 3,
         "rating 'four' is not a number"),
        ({"ratings.csv": HEAD_R + "1,10,4,1\n2,10,6,2\n"}, "ratings.csv", 3,
         "rating '6' is outside 0.5..5"),
        ({"ratings.csv": HEAD_R + "1,10,0,1\n"}, "ratings.csv", 2, "rating '0' is outside"),
        ({"ratings.csv": HEAD_R + "1,10,nan,1\n"}, "ratings.csv", 2, "rating 'nan' is outside"),
        ({"ratings.csv": HEAD_R + "1,10,4,1\n2,10,4,yesterday\n"}, "ratings.csv", 3,
         "timestamp 'yesterday' is not an integer"),
        ({"ratings.csv": HEAD_R + "1,10,4,1.5\n"}, "ratings.csv", 2, "timestamp '1.5'"),
        ({"ratings.csv": HEAD_R + "1,10,4,1\n1,99,4,2\n"}, "ratings.csv", 3,
         "unknown item id '99' (not in movies.csv)"),
        ({"ratings.csv": HEAD_R + "1,10,4,1\n8,10,4,2\n"}, "ratings.csv", 3,
         "unknown user id '8' (not in users.csv)"),
        ({"ratings.csv": HEAD_R + "1,10,4,1\n2,20,3,2\n1,10,5,3\n"}, "ratings.csv", 4,
         "duplicate rating of item '10' by user '1' (first on line 2)"),
        ({"movies.csv": HEAD_M + "10,A (1990),Drama\n20,B,Drama\n10,C,Drama\n"}, "movies.csv", 4,
         "duplicate movieId '10' (first on line 2)"),
        ({"movies.csv": HEAD_M + "10,A (1990),Drama\n20,B\n"}, "movies.csv", 3,
         "expected 3 columns"),
        ({"movies.csv": HEAD_M + "10,A,Drama\n,B,Drama\n"}, "movies.csv", 3, "empty movieId"),
        ({"movies.csv": HEAD_M + '10,"A,Drama\n'}, "movies.csv", None, "unexpected end of data"),
        ({"users.csv": HEAD_U + "1,31,F,writer,de\n1,40,M,artist,jp\n"}, "users.csv", 3,
         "duplicate userId '1' (first on line 2)"),
        ({"users.csv": HEAD_U + "1,old,F,writer,de\n"}, "users.csv", 2,
         "age 'old' is not a number"),
        ({"users.csv": HEAD_U + "1,20,F,writer,de\n2,-4,F,writer,de\n"}, "users.csv", 3,
         "age '-4' is not a non-negative number"),
        ({"users.csv": HEAD_U + "1,20,F,writer\n"}, "users.csv", 2, "expected 5 columns"),
        ({"genres.txt": "Animation\nComedy\n"}, "movies.csv", 3,
         "genre 'Adventure' is not in genres.txt"),
        ({"genres.txt": "Comedy\nAdventure\nComedy\nAnimation\n"}, "genres.txt", 3,
         "duplicate genre 'Comedy' (first on line 1)"),
        ({"genres.txt": "\n"}, "genres.txt", None, "no genres"),
    ],
)  # fmt: skip
def test_bad_csv_input_names_file_and_line(tmp_path, overrides, file, line, message):
    d = csv_dir(tmp_path, **overrides)
    with pytest.raises(DataError) as info:
        load_dataset(f"csv:{d}")
    text = str(info.value)
    assert text.startswith(str(d / file)), text
    assert message in text, text
    if line is not None:
        assert f"{file}, line {line}:" in text, text


def test_undecodable_bytes_name_the_line(tmp_path):
    d = csv_dir(tmp_path)
    (d / "movies.csv").write_bytes(HEAD_M.encode() + b"10,A,Drama\n20,Caf\xe9,Drama\n30,C,Drama\n")
    with pytest.raises(DataError, match=r"movies\.csv, line 3: not utf-8 text"):
        load_dataset(f"csv:{d}")


def test_data_error_is_user_facing():
    assert issubclass(DataError, UserFacingError)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("parquet:/tmp", "unknown dataset spec 'parquet:/tmp'"),
        ("csv", "needs a directory"),
        ("movielens-100k:", "needs a directory"),
        ("csv:/definitely/not/here", "/definitely/not/here: no such directory"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


# --- MovieLens 100K layout ---------------------------------------------------------------

GENRE = "unknown|0\nAction|1\nComedy|2\n\n"
ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n"
    "2|Heat (1995)|4-Feb-1996||http://x|0|1|0\n"
    "3|Mystery Reel (1987)|||http://x|1|0|0\n"
    "4|unknown|||http://x|1|0|0\n"
)
USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|30|M|writer|T8H1N\n"
DATA = "1\t1\t5\t874965758\n2\t2\t3\t876893171\n3\t1\t4\t878542960\n1\t3\t1\t875071561\n"


def ml_dir(tmp_path: Path, **overrides: str | None) -> Path:
    files = {"u.genre": GENRE, "u.item": ITEM, "u.user": USER, "u.data": DATA}
    files.update(overrides)
    d = tmp_path / "ml-100k"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        if text is not None:
            (d / name).write_text(text, encoding="latin-1")
    return d


def test_ml100k_layout_parses(tmp_path):
    ds = load_dataset(f"movielens-100k:{ml_dir(tmp_path)}")
    assert ds.name == "movielens-100k"
    assert ds.genres == ["unknown", "Action", "Comedy"]
    assert ds.item_ids == ["1", "2", "3", "4"]
    np.testing.assert_array_equal(ds.item_year, [1995, 1996, 1987, np.nan])  # date, else title
    np.testing.assert_array_equal(ds.item_genres[:2], [[0, 0, 1], [0, 1, 0]])
    assert ds.user_country == ["us-mountain", "us-west", "ca"]
    assert ds.user_gender == ["M", "F", "M"] and ds.user_occupation[0] == "technician"
    np.testing.assert_array_equal(ds.user_age, [24, 53, 30])
    np.testing.assert_array_equal(ds.rating_user, [0, 1, 2, 0])
    np.testing.assert_array_equal(ds.rating_item, [0, 1, 0, 2])
    np.testing.assert_array_equal(ds.rating, [5, 3, 4, 1])
    assert ds.timestamp[0] == 874965758
    assert (ds.rating_min, ds.rating_max) == (1.0, 5.0)


@pytest.mark.parametrize(
    "overrides, file, line, message",
    [
        ({"u.user": None}, "u.user", None, "file not found (MovieLens 100K needs u.data"),
        ({"u.data": ""}, "u.data", None, "no ratings"),
        ({"u.item": ""}, "u.item", None, "no items"),
        ({"u.genre": "unknown|0\nAction|2\n"}, "u.genre", 2, "genre index 2 should be 1"),
        ({"u.item": ITEM + "5|Bad|01-Jan-1990||u|0|2|0\n"}, "u.item", 5,
         "genre flag 'Action' is '2', expected 0 or 1"),
        ({"u.item": ITEM + "5|Short|01-Jan-1990||u|0|1\n"}, "u.item", 5,
         "expected 8 columns (id, title, release date, video date, URL, unknown, Action, Comedy)"),
        ({"u.item": ITEM + "2|Again|01-Jan-1990||u|0|1|0\n"}, "u.item", 5,
         "duplicate item id '2' (first on line 2)"),
        ({"u.item": ITEM + "5|Odd|sometime||u|0|1|0\n"}, "u.item", 5,
         "release date 'sometime' is not like 01-Jan-1995"),
        ({"u.user": USER + "4|x|M|writer|12345\n"}, "u.user", 4, "age 'x' is not a number"),
        ({"u.data": DATA + "1\t9\t4\t875071561\n"}, "u.data", 5,
         "unknown item id '9' (not in u.item)"),
        ({"u.data": "7\t1\t4\t875071561\n"}, "u.data", 1, "unknown user id '7' (not in u.user)"),
        ({"u.data": DATA + "2\t1\t4\tnoon\n"}, "u.data", 5, "timestamp 'noon' is not an integer"),
        ({"u.data": DATA + "2\t1\t4.5.1\t875071561\n"}, "u.data", 5, "rating '4.5.1'"),
        ({"u.data": DATA + "2\t1\t0.5\t875071561\n"}, "u.data", 5, "outside 1..5"),
        ({"u.data": DATA + "2 1 4 875071561\n"}, "u.data", 5, "expected 4 columns"),
    ],
)  # fmt: skip
def test_bad_ml100k_input_names_file_and_line(tmp_path, overrides, file, line, message):
    d = ml_dir(tmp_path, **overrides)
    with pytest.raises(DataError) as info:
        load_dataset(f"movielens-100k:{d}")
    text = str(info.value)
    assert text.startswith(str(d / file)), text
    assert message in text, text
    if line is not None:
        assert f"{file}, line {line}:" in text, text


def test_windows_line_endings_and_bom_parse_the_same(tmp_path):
    plain = load_dataset(f"csv:{csv_dir(tmp_path / 'a')}")
    crlf = {
        name: "\ufeff" + text.replace("\n", "\r\n")
        for name, text in {"ratings.csv": RATINGS, "movies.csv": MOVIES, "users.csv": USERS}.items()
    }
    other = load_dataset(f"csv:{csv_dir(tmp_path / 'b', **crlf)}")
    assert other.sha256() == plain.sha256()
    assert other.item_title == plain.item_title


def test_quoted_file_with_blank_lines_keeps_line_numbers(tmp_path):
    movies = HEAD_M + '10,"A, B (1990)",Drama\n\n20,"C\nD (1991)",Drama\n\n30,E,Drama,extra\n'
    with pytest.raises(DataError, match=r"movies\.csv, line 7: expected 3 columns"):
        load_dataset(f"csv:{csv_dir(tmp_path, **{'movies.csv': movies})}")


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_utf8_copy_of_ml100k_reads_like_the_latin1_original(tmp_path, bom):
    """Re-saved as UTF-8 (a BOM, sometimes), titles were garbled and the BOM joined an id."""
    item = ITEM.replace("Toy Story", "Misérables, Les")
    (tmp_path / "latin").mkdir()
    (tmp_path / "utf8").mkdir()
    latin = ml_dir(tmp_path / "latin", **{"u.item": item})
    utf8 = ml_dir(tmp_path / "utf8", **{"u.item": item})
    for name in ("u.item", "u.data", "u.user", "u.genre"):
        text = (latin / name).read_bytes().decode("latin-1")
        (utf8 / name).write_bytes(bom + text.encode("utf-8"))
    a = load_dataset(f"movielens-100k:{latin}")
    b = load_dataset(f"movielens-100k:{utf8}")
    assert a.item_title[0] == b.item_title[0] == "Misérables, Les (1995)"
    assert b.user_ids == a.user_ids and b.sha256() == a.sha256()


@pytest.mark.parametrize("layout", ["csv", "ml100k"])
def test_lines_of_spaces_are_blank_lines(tmp_path, layout):
    """A hand edit's trailing "   " line stopped the load with a column-count error."""
    if layout == "ml100k":
        d = ml_dir(tmp_path, **{"u.data": DATA + "   \n", "u.user": USER + " \t\n"})
        ds = load_dataset(f"movielens-100k:{d}")
        assert ds.n_ratings == 4 and ds.n_users == 3
    else:
        ratings = 'userId,movieId,rating,timestamp\n1,10,4,1\n   \n"2",10,4,2\n  \n'
        ds = load_dataset(f"csv:{csv_dir(tmp_path, **{'ratings.csv': ratings})}")
        assert ds.n_ratings == 2

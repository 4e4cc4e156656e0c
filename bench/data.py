"""Data-layer benchmark: synthetic generation at catalogue scale and MovieLens loading.

Figures and the baseline each is divided by (measured in this process, in
this run, so the ratio cancels most of the machine's speed and load):

* ``generate_1m``: ``generate(n_users=50_000, n_items=1_000_000,
  n_ratings=2_000_000)`` against a floor any generator of this kind pays:
  drawing the same number of (user, item) pairs from the same popularity
  weights and de-duplicating them once. The ratio says what the latent
  tastes, demographics, rating model and titles cost on top.
* ``generate_default``: the quick-start dataset (2,000 x 1,500, 100k ratings),
  same kind of floor.
* ``load_ml100k``: ``load_dataset("movielens-100k:...")`` against just reading
  the four files with the ``csv`` module (no parsing into numbers, no
  checks). The ratio is the price of validation and building the arrays.
* ``csv_round_trip`` (full run only): ``write_csv`` then ``load_dataset("csv:...")``
  of the 1M-item dataset, against reading the written files with ``csv``.

Peak resident memory of this process is reported after generation (the
runner gives each area its own process).
"""

from __future__ import annotations

import csv
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, header, ratio, target

SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _best(fn, repeat: int) -> float:
    """Fastest of ``repeat`` wall-clock runs (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _pair_floor(n_users: int, n_items: int, n_ratings: int, seed: int = 0) -> None:
    """Weighted pair draws plus one de-duplication: the floor of any such generator."""
    rng = np.random.default_rng(seed)
    user_cdf = np.cumsum(rng.lognormal(0.0, 1.0, n_users))
    item_cdf = np.cumsum((rng.permutation(n_items) + 10.0) ** -1.0)
    m = 2 * n_ratings
    users = np.searchsorted(user_cdf, np.sort(rng.random(m)) * user_cdf[-1])
    items = np.searchsorted(item_cdf, np.sort(rng.random(m)) * item_cdf[-1])
    rng.shuffle(users)
    rng.shuffle(items)
    # Sort-based: plain np.unique on int64 takes a much slower hashing path in numpy 2.4.
    codes = np.sort(users.astype(np.int64) * n_items + items)
    codes[np.concatenate(([True], codes[1:] != codes[:-1]))]


def _read_raw(paths: list[Path], delimiter: str) -> int:
    rows = 0
    for p in paths:
        with open(p, encoding="latin-1", newline="") as f:
            rows += sum(1 for _ in csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE))
    return rows


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(quick: bool = False) -> dict[str, Any]:
    from trainer.loaders import load_dataset
    from trainer.synthetic import generate, write_csv

    print(header("data: synthetic generation and loaders", "data", quick), flush=True)
    out: dict[str, Any] = {"ratios": {}, "targets": []}
    big = (10_000, 100_000, 400_000) if quick else (50_000, 1_000_000, 2_000_000)
    repeat = 1 if quick else 2

    # Default quick-start dataset.
    t_default = _best(lambda: generate(), 3)
    t_default_floor = _best(lambda: _pair_floor(2000, 1500, 100_000), 3)
    out["ratios"]["generate_default"] = ratio(t_default, t_default_floor, unit="s")
    print(f"  generate 2,000 x 1,500, 100k ratings: {t_default:.3f} s "
          f"(floor {t_default_floor:.3f} s, x{t_default / t_default_floor:.1f})")  # fmt: skip

    # Catalogue scale.
    rss_before = _peak_rss_mib()
    holder: dict[str, Any] = {}
    t_big = _best(lambda: holder.update(ds=generate(*big)), repeat)
    rss_after = _peak_rss_mib()
    t_big_floor = _best(lambda: _pair_floor(*big), repeat)
    ds = holder.pop("ds")
    label = f"{big[0]:,} users x {big[1]:,} items, {big[2]:,} ratings"
    out["generate_big"] = {
        "users": big[0], "items": big[1], "ratings": big[2], "seconds": t_big,
        "ratings_per_s": big[2] / t_big, "peak_rss_mib": rss_after,
        "peak_rss_growth_mib": rss_after - rss_before,
    }  # fmt: skip
    out["ratios"]["generate_1m" if not quick else "generate_100k"] = ratio(
        t_big, t_big_floor, unit="s", what=label
    )
    out["targets"].append(target(f"generate {label} (s)", t_big, "<", 60.0))
    print(f"  generate {label}: {t_big:.2f} s (floor {t_big_floor:.2f} s, "
          f"x{t_big / t_big_floor:.1f}); peak RSS {rss_after:.0f} MiB")  # fmt: skip

    if not quick:
        with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
            t = time.perf_counter()
            write_csv(ds, tmp)
            t_write = time.perf_counter() - t
            t = time.perf_counter()
            back = load_dataset(f"csv:{tmp}")
            t_load = time.perf_counter() - t
            files = [Path(tmp, n) for n in ("ratings.csv", "movies.csv", "users.csv")]
            t_raw = _best(lambda: _read_raw(files, ","), 1)
            same = back.sha256() == ds.sha256()
        out["csv_round_trip"] = {"write_s": t_write, "load_s": t_load, "hash_equal": same}
        out["ratios"]["load_csv_1m"] = ratio(t_load, t_raw, unit="s")
        print(f"  write_csv {t_write:.2f} s, load csv {t_load:.2f} s (raw csv read "
              f"{t_raw:.2f} s, x{t_load / t_raw:.1f}), hash equal: {same}")  # fmt: skip
    del ds  # free the big catalogue before the MovieLens timing

    ml = SHARED_DATA / "ml-100k"
    if (ml / "u.data").is_file():
        spec = f"movielens-100k:{ml}"
        load_dataset(spec)  # warm the page cache for both sides
        t_load = _best(lambda: load_dataset(spec), 5)
        t_raw = _best(
            lambda: (
                _read_raw([ml / "u.data"], "\t"),
                _read_raw([ml / f for f in ("u.item", "u.user", "u.genre")], "|"),
            ),
            5,
        )
        out["load_ml100k"] = {"seconds": t_load, "ratings_per_s": 100_000 / t_load}
        out["ratios"]["load_ml100k"] = ratio(t_load, t_raw, unit="s")
        out["targets"].append(target("load MovieLens 100K (s)", t_load, "<", 1.0))
        print(f"  load MovieLens 100K: {t_load:.3f} s (raw csv read {t_raw:.3f} s, "
              f"x{t_load / t_raw:.1f})")  # fmt: skip
    else:
        out["load_ml100k"] = {"skipped": f"MovieLens 100K not found at {ml}"}
        print(f"  load MovieLens 100K: skipped ({ml} not found)")
    return out


if __name__ == "__main__":
    run()

"""Benchmarks: one module per area, each exposing ``run(quick: bool = False) -> dict``.

``python -m bench`` (or ``make bench``) runs every area that exists and writes
``bench/results/<date>-<host>.md`` and ``.json``; see :mod:`bench.common`.
"""

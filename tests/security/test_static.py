"""Static checks: no pickle anywhere in the code, every dependency bounded and pinned."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = (
    "recsys",
    "retrieval_service",
    "ranking_service",
    "trainer",
    "bench",
    "scripts",
    "tests",
)
# Modules that unpickle (or run pickle underneath) when they load data.
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
PICKLING_CALLS = {"read_pickle", "to_pickle"}


def pickle_uses(source: str, name: str = "<string>") -> list[str]:
    """Every place in ``source`` that could (un)pickle, as ``name:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in PICKLING_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLING_MODULES:
                found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{where}: allow_pickle is not the literal False")
            if attr in PICKLING_CALLS:
                found.append(f"{where}: {attr}()")
            # np.load defaults to allow_pickle=False today, but say it at every call.
            if (
                attr == "load"
                and isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id in ("np", "numpy")
                and not any(kw.arg == "allow_pickle" for kw in node.keywords)
            ):
                found.append(f"{where}: np.load without allow_pickle=False")
    return found


def test_the_scanner_finds_each_kind_of_pickle_use():
    bad = (
        "import pickle\nfrom joblib import load\nimport numpy as np\n"
        "np.load('a.npy', allow_pickle=True)\nnp.load('b.npy')\npd.read_pickle('c')\n"
        "np.load('d.npy', allow_pickle=flag)\n"
    )
    found = pickle_uses(bad)
    assert len(found) == 6, found
    assert pickle_uses("import numpy as np\nnp.load('a.npy', allow_pickle=False)\n") == []


def test_no_code_uses_pickle():
    files = [p for d in CODE_DIRS for p in (REPO / d).rglob("*.py") if "/v1/" not in str(p)]
    assert len(files) > 50
    found = []
    for path in files:
        found += pickle_uses(path.read_text(), str(path.relative_to(REPO)))
    assert found == []


def _pyproject_requirements() -> list[Requirement]:
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = list(doc["project"]["dependencies"])
    for extra in doc["project"].get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", line)
        assert m, f"constraints.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(m.group(1))] = m.group(3)
    return pins


def test_every_dependency_has_an_upper_bound_and_a_pin_it_allows():
    reqs = _pyproject_requirements()
    pins = _constraints()
    assert len(reqs) >= 10
    problems = []
    for req in reqs:
        ops = {s.operator for s in req.specifier}
        if not ops & {"<", "<=", "==", "~=", "==="}:
            problems.append(f"{req}: no upper bound")
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name}: not pinned in constraints.txt")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req.name}: pin {pin} is outside {req.specifier}")
    assert problems == []

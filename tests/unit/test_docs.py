"""README.md and docs/*.md match the repository: the tests they cite, the Pythons it takes."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# `tests/x/test_a.py::test_b[id1|id2]`, a bare `test_a.py`, or `::test_c` (same file as
# the citation before it on the line, as the tables in docs/operations.md write them);
# a name starts with test or Test, so an address (`::1`) is none.
_CITATION = re.compile(
    r"(?P<file>(?:tests/[\w/]+/)?test_\w+\.py)"
    r"|::(?P<name>[Tt]est\w*(?:::\w+)*)(?:\[(?P<ids>[^\]`]+)\])?"
)


def _test_file(cited: str) -> Path | str:
    """The file ``cited`` names, or why it names none (a bare name must be unique in tests/)."""
    if "/" in cited:
        path = REPO / cited
        return path if path.is_file() else f"{cited} does not exist"
    found = sorted((REPO / "tests").rglob(cited))
    if len(found) != 1:
        return f"{cited} matches {len(found)} files under tests/ (give its path)"
    return found[0]


def _missing(path: Path, name: str, ids: str | None) -> str | None:
    """Why ``path::name[ids]`` is no test there, or None when it is one."""
    scope: list[ast.stmt] = ast.parse(path.read_text()).body
    node: ast.stmt | None = None
    for part in name.split("::"):
        node = next(
            (
                n
                for n in scope
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                and n.name == part
            ),
            None,
        )
        if node is None:
            return f"{path.relative_to(REPO)} has no {name}"
        scope = node.body if isinstance(node, ast.ClassDef) else []
    if ids is None:
        return None
    parametrized = any(
        isinstance(d, ast.Call) and ast.unparse(d.func).endswith("parametrize")
        for d in node.decorator_list
    )
    if not parametrized:
        return f"{name} in {path.relative_to(REPO)} is not parametrized, so has no [{ids}]"
    # A parameter id is the parameter's string value: it is written in the module.
    strings = {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    unknown = [i for i in ids.split("|") if i not in strings]
    return f"{name}: no parameter {'|'.join(unknown)}" if unknown else None


def citation_errors(text: str) -> tuple[int, list[str]]:
    """How many test citations ``text`` holds, and one line per citation that names no test."""
    count, errors = 0, []
    for lineno, line in enumerate(text.splitlines(), 1):
        current: Path | str | None = None
        for m in _CITATION.finditer(line):
            count += 1
            if m["file"]:
                current = _test_file(m["file"])
                if isinstance(current, str):
                    errors.append(f"line {lineno}: {current}")
                continue
            if current is None:
                errors.append(f"line {lineno}: ::{m['name']} follows no test file")
            elif isinstance(current, Path):
                why = _missing(current, m["name"], m["ids"])
                if why:
                    errors.append(f"line {lineno}: {why}")
    return count, errors


def test_every_test_the_docs_cite_exists():
    total, errors = 0, []
    for page in PAGES:
        count, page_errors = citation_errors(page.read_text())
        total += count
        errors += [f"{page.relative_to(REPO)} {e}" for e in page_errors]
    assert not errors, "\n".join(errors)
    # The pattern still finds the citations docs/operations.md's tables are made of.
    assert total > 40


def test_a_citation_of_a_renamed_or_unknown_test_is_reported():
    _, errors = citation_errors(
        "`tests/reliability/test_bad_versions.py::test_retrieval_refuses_broken_versions`, "
        "`::test_service_refuses_broken_versions_and_keeps_serving[retrieval|redis]`\n"
        "`test_hostile_input.py::test_hand_picked_hostile_messages[x]` `test_nowhere.py`\n"
        "`::test_service_refuses_broken_versions_and_keeps_serving`"
    )
    assert errors == [
        "line 1: tests/reliability/test_bad_versions.py has no "
        "test_retrieval_refuses_broken_versions",
        "line 1: test_service_refuses_broken_versions_and_keeps_serving: no parameter redis",
        "line 2: test_hand_picked_hostile_messages in tests/reliability/test_hostile_input.py "
        "is not parametrized, so has no [x]",
        "line 2: test_nowhere.py matches 0 files under tests/ (give its path)",
        "line 3: ::test_service_refuses_broken_versions_and_keeps_serving follows no test file",
    ]


def test_the_quick_start_names_the_pythons_pyproject_accepts():
    spec = SpecifierSet(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    )
    accepted = [f"3.{minor}" for minor in range(8, 20) if f"3.{minor}.0" in spec]
    quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1]
    quick_start = quick_start.split("\n## ", 1)[0]
    assert f"Python {', '.join(accepted[:-1])} or {accepted[-1]}" in quick_start, accepted


def test_the_readme_lists_every_benchmark_area_python_m_bench_runs():
    from bench.__main__ import AREAS

    performance = (REPO / "README.md").read_text().split("## Performance", 1)[1]
    listed = re.findall(r"`(?:bench/)?(\w+)\.py`", performance.split("\n\n", 2)[1])
    assert listed == list(AREAS)

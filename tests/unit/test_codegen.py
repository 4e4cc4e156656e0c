"""The committed generated gRPC code must match the .proto files."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
gen_protos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_protos)


def test_committed_code_matches_protos():
    problems = gen_protos.check()
    assert problems == [], "\n".join(problems)


def test_check_detects_a_proto_changed_without_regeneration(tmp_path: Path):
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos", protos)
    code = tmp_path / "code"
    shutil.copytree(REPO / "recsys" / "v1", code / "recsys" / "v1")
    assert gen_protos.check(protos, code) == []
    target = protos / "recsys" / "v1" / "ranking.proto"
    target.write_text(
        target.read_text().replace("bool debug = 5;", "bool debug = 5;\n  int32 extra = 99;", 1)
    )
    problems = gen_protos.check(protos, code)
    assert any("ranking_pb2" in p and "stale" in p for p in problems), problems


def test_generated_package_imports_from_any_directory(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-c",
         "from recsys.v1 import ranking_pb2, retrieval_pb2_grpc, common_pb2;"
         "print(ranking_pb2.DESCRIPTOR.package)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "recsys.v1"


@pytest.mark.parametrize(
    ("service", "methods"),
    [
        ("RetrievalService", {"Retrieve", "RetrieveMany", "SimilarItems", "RecordInteraction"}),
        ("RankingService", {"Rank", "Recommend"}),
    ],
)
def test_services_expose_the_contracted_rpcs(service, methods):
    from recsys.v1 import ranking_pb2, retrieval_pb2

    pool = {**retrieval_pb2.DESCRIPTOR.services_by_name, **ranking_pb2.DESCRIPTOR.services_by_name}
    assert {m.name for m in pool[service].methods} == methods
    assert pool[service].full_name == f"recsys.v1.{service}"


def test_every_proto_field_has_a_comment():
    """Fields without a leading // comment would leave the contract undocumented."""
    missing = []
    for proto in sorted((REPO / "protos" / "recsys" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_field = (
                s.endswith(";")
                and "=" in s
                and not s.startswith(("syntax", "package", "option", "//"))
            )
            if is_field and not lines[i - 1].strip().startswith("//"):
                missing.append(f"{proto.name}:{i + 1}: {s}")
    assert missing == []

"""Regenerates the Python gRPC code in ``recsys/v1`` from ``protos/``.

The one codegen entry point used by developers, CI and the Dockerfile. The
generated files are committed so a plain ``pip install`` needs no build step;
``--check`` regenerates into a scratch directory and fails on any difference,
which is how the test suite catches a ``.proto`` edited without regeneration.

Usage:
    python scripts/gen_protos.py           # rewrite recsys/v1/*_pb2*.py
    python scripts/gen_protos.py --check   # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("recsys") / "v1"
# Generated code embeds the generator's protobuf version, so output only
# matches byte for byte when everyone uses the same grpcio-tools.
PINNED_GRPCIO_TOOLS = "1.85.1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compiles every proto under ``<proto_root>/recsys/v1`` into ``out_root``.

    protoc runs in a child process: loading grpc_tools' bundled protobuf into
    a process that already imported TensorFlow (as a test session does)
    crashes the interpreter.
    """
    protos = sorted((proto_root / PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root / PACKAGE_DIR}")
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    script = (
        "import sys, pathlib\n"
        "from grpc_tools import protoc\n"
        "include = pathlib.Path(protoc.__file__).parent / '_proto'\n"
        "sys.exit(protoc.main(['grpc_tools.protoc', f'-I{include}', *sys.argv[1:]]))\n"
    )
    args = [
        f"-I{proto_root}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(proto_root)) for p in protos],
    ]
    # protoc resolves relative proto paths against -I roots, not the cwd.
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"protoc failed: {done.stderr.strip()}")
    return sorted(
        p for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def _committed(code_root: Path) -> dict[str, str]:
    d = code_root / PACKAGE_DIR
    return {p.name: p.read_text() for p in d.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def check(proto_root: Path = PROTO_ROOT, code_root: Path = ROOT) -> list[str]:
    """Returns human-readable differences between committed and fresh code."""
    problems: list[str] = []
    have = version("grpcio-tools")
    if have != PINNED_GRPCIO_TOOLS:
        problems.append(
            f"grpcio-tools {have} is installed but codegen is pinned to {PINNED_GRPCIO_TOOLS}; "
            f"install the constraints file first"
        )
        return problems
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp), proto_root)}
    committed = _committed(code_root)
    for name in sorted(set(fresh) | set(committed)):
        if name not in committed:
            problems.append(f"{PACKAGE_DIR / name} is missing (run scripts/gen_protos.py)")
        elif name not in fresh:
            problems.append(f"{PACKAGE_DIR / name} has no .proto any more (delete it)")
        elif fresh[name] != committed[name]:
            diff = "".join(
                list(
                    difflib.unified_diff(
                        committed[name].splitlines(True),
                        fresh[name].splitlines(True),
                        f"committed/{name}",
                        f"generated/{name}",
                    )
                )[:40]
            )
            problems.append(f"{PACKAGE_DIR / name} is stale:\n{diff}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    for p in generate(ROOT):
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

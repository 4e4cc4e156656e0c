"""Kubernetes manifests: rendering, schema validation, security rules, policies.

No cluster is needed. Each overlay is rendered with ``deploy/render.py`` (and
compared with ``kubectl kustomize`` where kubectl is installed), every object
is validated against the Kubernetes OpenAPI schemas bundled in
``kubernetes-validate`` in strict mode, and the security rules are checked
explicitly (checkov, the usual linter, pins packages that conflict with this
project's constraints, so it cannot run in the test environment).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "CronJob"}
# Oldest Kubernetes the manifests target (native gRPC probes and CronJob
# timeZone are GA since 1.27) and the newest schema the validator bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _load_renderer():
    spec = importlib.util.spec_from_file_location("deploy_render", REPO / "deploy" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render.build(K8S / "overlays" / name) for name in OVERLAYS}


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_spec(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["metadata"]["labels"]


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


# --- rendering ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_contains_the_whole_system(rendered, overlay):
    docs = rendered[overlay]
    for kind, name in [
        ("Deployment", "retrieval"),
        ("Deployment", "ranking"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("Service", "retrieval"),
        ("Service", "retrieval-headless"),
        ("Service", "ranking"),
        ("Job", "recsys-bootstrap"),
        ("CronJob", "recsys-retrain"),
        ("PersistentVolumeClaim", "recsys-models"),
        ("ConfigMap", "recsys-config"),
        ("Secret", "recsys-redis"),
        ("HorizontalPodAutoscaler", "retrieval"),
        ("HorizontalPodAutoscaler", "ranking"),
        ("PodDisruptionBudget", "retrieval"),
        ("PodDisruptionBudget", "ranking"),
        ("NetworkPolicy", "recsys-default-deny"),
    ]:
        find(docs, kind, name)
    assert {d["metadata"]["namespace"] for d in docs} == {"recsys"}
    assert find(docs, "PersistentVolumeClaim", "recsys-models")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(rendered, overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in rendered[overlay]}
    assert set(ours) == set(theirs)
    for key, doc in ours.items():
        assert json.dumps(doc, sort_keys=True) == json.dumps(theirs[key], sort_keys=True), key


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {team: x}\n")
    with pytest.raises(render.KustomizeError, match="commonLabels"):
        render.build(tmp_path)
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches: [{path: p.yaml}]\n"
    )
    with pytest.raises(render.KustomizeError, match="not found"):
        render.build(tmp_path)


def test_strategic_merge_follows_kubernetes_list_semantics():
    base = {
        "containers": [
            {"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
            {"name": "b", "image": "b"},
        ],
        "tolerations": [{"key": "old"}],
        "drop": 1,
    }
    patch = {
        "containers": [{"name": "a", "env": [{"name": "Y", "value": "3"}]}],
        "tolerations": [{"key": "new"}],
        "drop": None,
    }
    out = render.merge(base, patch)
    assert out["containers"][0]["env"] == [{"name": "Y", "value": "3"}, {"name": "X", "value": "1"}]
    assert out["containers"][1] == {"name": "b", "image": "b"}
    assert out["tolerations"] == [{"key": "new"}]
    assert "drop" not in out
    assert base["containers"][0]["env"][1]["value"] == "2"  # input untouched


# --- schemas -----------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(rendered, overlay, version):
    for doc in rendered[overlay]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_a_misspelled_field(rendered):
    doc = copy.deepcopy(find(rendered["cpu"], "Deployment", "ranking"))
    c = pod_spec(doc)["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


# --- security ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(rendered, overlay):
    for doc in workloads(rendered[overlay]):
        where = f"{overlay}:{doc['kind']}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["runAsUser"] >= 10000, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), where
        assert all("hostPath" not in v for v in spec.get("volumes", [])), where
        for c in containers(doc):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (where, kind)
            image = c["image"]
            assert not image.endswith(":latest") and (":" in image.rsplit("/", 1)[-1]), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_read_only_root_has_a_writable_tmp(rendered, overlay):
    for doc in workloads(rendered[overlay]):
        if doc["metadata"]["name"] == "redis":
            continue
        volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
        for c in containers(doc):
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_mount_models_read_only_and_the_trainer_read_write(rendered, overlay):
    docs = rendered[overlay]
    for name in ("retrieval", "ranking"):
        c = pod_spec(find(docs, "Deployment", name))["containers"][0]
        assert {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}["/models"]
    # The export writes its directory of exports beside the versions.
    for c in pod_spec(find(docs, "CronJob", "recsys-retrain"))["initContainers"]:
        assert not {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}["/models"]
    # A publish that deletes old version directories must be able to.
    for c in (c for doc in workloads(docs) for c in containers(doc)):
        if "--keep-dirs" in (c.get("args") or []) + (c.get("command") or []):
            mounts = {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}
            assert not mounts["/models"], c["name"]


# --- availability ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_and_budgets_target_the_services(rendered, overlay):
    docs = rendered[overlay]
    for name in ("retrieval", "ranking"):
        dep = find(docs, "Deployment", name)
        assert "replicas" not in dep["spec"], "the HPA owns replicas"
        hpa = find(docs, "HorizontalPodAutoscaler", name)
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        pdb = find(docs, "PodDisruptionBudget", name)
        labels = pod_labels(dep)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # A budget of one unavailable pod must still leave one serving.
        assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
        assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]


def test_trainer_jobs_train_then_publish_once_at_a_time(rendered):
    docs = rendered["cpu"]
    cron = find(docs, "CronJob", "recsys-retrain")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    spec = pod_spec(cron)
    assert [c["args"][0] for c in spec["initContainers"]] == ["export-interactions", "train"]
    assert [c["args"][0] for c in spec["containers"]] == ["publish"]
    # The ratings recorded online train the next version, from where the export wrote them.
    export, train = spec["initContainers"]
    assert train["args"][train["args"].index("--interactions") + 1] == export["args"][1]
    boot = pod_spec(find(docs, "Job", "recsys-bootstrap"))["containers"][0]
    script = boot["args"][0]
    assert "/models/[0-9]*" in script and "recsys train" in script and "--publish" in script


# --- networking --------------------------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peer: dict, policy_ns: str, pod: dict) -> bool:
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], pod["ns_labels"]):
            return False
    elif pod["ns"] != policy_ns:
        return False
    return _selects(peer.get("podSelector", {}), pod["labels"])


def _port_matches(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port for p in ports)


def _allowed(policies: list[dict], direction: str, pod: dict, peer: dict, port: int) -> bool:
    """NetworkPolicy semantics for one direction of one connection."""
    ptype = "Ingress" if direction == "ingress" else "Egress"
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod["ns"]
        and _selects(p["spec"]["podSelector"], pod["labels"])
        and ptype in p["spec"]["policyTypes"]
    ]
    if not selecting:
        return True
    key = "from" if direction == "ingress" else "to"
    return any(
        _port_matches(rule, port)
        and any(_peer_matches(x, p["metadata"]["namespace"], peer) for x in rule.get(key, []))
        for p in selecting
        for rule in p["spec"].get(direction, [])
    )


def can_connect(policies: list[dict], src: dict, dst: dict, port: int) -> bool:
    return _allowed(policies, "egress", src, dst, port) and _allowed(
        policies, "ingress", dst, src, port
    )


def _pod(name: str, ns: str = "recsys", **extra: str) -> dict:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "recsys"}
    if ns != "recsys":
        labels = {}
    labels.update(extra)
    return {"ns": ns, "ns_labels": {"kubernetes.io/metadata.name": ns}, "labels": labels}


def test_network_policies_allow_exactly_the_intended_paths(rendered):
    policies = [d for d in rendered["cpu"] if d["kind"] == "NetworkPolicy"]
    ranking, retrieval, redis, trainer = (
        _pod(n) for n in ("ranking", "retrieval", "redis", "trainer")
    )
    client = _pod("web", ns="frontend", **{"recsys-client": "true"})
    stranger = _pod("web", ns="frontend")
    prometheus = _pod("x", ns="monitoring", **{"app.kubernetes.io/name": "prometheus"})
    dns = {
        "ns": "kube-system",
        "ns_labels": {"kubernetes.io/metadata.name": "kube-system"},
        "labels": {"k8s-app": "kube-dns"},
    }
    allowed = [
        (client, ranking, 50052),
        (client, retrieval, 50051),
        (ranking, retrieval, 50051),
        (ranking, redis, 6379),
        (retrieval, redis, 6379),
        (trainer, redis, 6379),
        (prometheus, ranking, 9092),
        (prometheus, retrieval, 9091),
        (ranking, dns, 53),
        (trainer, dns, 53),
    ]
    denied = [
        (stranger, ranking, 50052),
        (stranger, retrieval, 50051),
        (client, redis, 6379),
        (client, ranking, 9092),
        (prometheus, redis, 6379),
        (retrieval, ranking, 50052),
        (trainer, retrieval, 50051),
        (redis, retrieval, 50051),
        (ranking, stranger, 443),
        (retrieval, client, 80),
    ]
    for src, dst, port in allowed:
        assert can_connect(policies, src, dst, port), (src["labels"], dst["labels"], port)
    for src, dst, port in denied:
        assert not can_connect(policies, src, dst, port), (src["labels"], dst["labels"], port)


def test_policy_checker_sees_a_missing_rule(rendered):
    policies = copy.deepcopy([d for d in rendered["cpu"] if d["kind"] == "NetworkPolicy"])
    ranking, retrieval = _pod("ranking"), _pod("retrieval")
    assert can_connect(policies, ranking, retrieval, 50051)
    for p in policies:
        if p["metadata"]["name"] == "retrieval":
            p["spec"]["ingress"] = p["spec"]["ingress"][1:]
    assert not can_connect(policies, ranking, retrieval, 50051)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_headless_service_backs_client_side_round_robin(rendered, overlay):
    docs = rendered[overlay]
    headless = find(docs, "Service", "retrieval-headless")
    assert headless["spec"]["clusterIP"] == "None"
    dep = find(docs, "Deployment", "retrieval")
    assert headless["spec"]["selector"].items() <= pod_labels(dep).items()
    ranking = pod_spec(find(docs, "Deployment", "ranking"))["containers"][0]
    env = {e["name"]: e for e in ranking["env"]}
    address = env["RECSYS_RANKING__RETRIEVAL_ADDRESS"]["value"]
    assert address.startswith("dns:///retrieval-headless.$(POD_NAMESPACE).svc")
    assert address.rsplit(":", 1)[1] == str(headless["spec"]["ports"][0]["port"])
    names = [e["name"] for e in ranking["env"]]
    assert names.index("POD_NAMESPACE") < names.index("RECSYS_RANKING__RETRIEVAL_ADDRESS")


def test_ranking_channel_balances_round_robin():
    channels = pytest.importorskip("recsys.channels")
    config = json.loads(channels.service_config())
    assert {"round_robin": {}} in config["loadBalancingConfig"]


# --- GPU ---------------------------------------------------------------------------


def test_gpu_overlay_puts_ranking_on_a_gpu(rendered):
    gpu = find(rendered["gpu"], "Deployment", "ranking")
    spec = pod_spec(gpu)
    c = spec["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["image"].split(":")[0].endswith("/recsys-gpu")
    assert {e["name"]: e.get("value") for e in c["env"]}["RECSYS_RANKING__DEVICE"] == "gpu"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["nodeSelector"]
    # Everything else is the CPU install, unchanged.
    cpu_docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered["cpu"]}
    for d in rendered["gpu"]:
        key = (d["kind"], d["metadata"]["name"])
        if key not in {("Deployment", "ranking"), ("HorizontalPodAutoscaler", "ranking")}:
            assert d == cpu_docs[key], key


def test_gpu_rollouts_do_not_need_a_spare_gpu(rendered):
    """A surge pod would wait for a free GPU while maxUnavailable 0 kept every old pod."""
    strategy = find(rendered["gpu"], "Deployment", "ranking")["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    pdb = find(rendered["gpu"], "PodDisruptionBudget", "ranking")["spec"]
    assert pdb.get("maxUnavailable", 1) >= 1


def test_redis_leaves_room_under_its_memory_limit_for_a_rewrite(rendered):
    """An AOF rewrite forks: maxmemory must stay well under the container's limit."""
    redis = find(rendered["cpu"], "StatefulSet", "redis")
    c = pod_spec(redis)["containers"][0]
    maxmemory = c["args"][c["args"].index("--maxmemory") + 1]
    assert maxmemory.endswith("mb")
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert int(maxmemory[:-2]) <= 0.65 * int(limit[:-2]) * 1024


def test_cpu_overlay_asks_for_no_gpu(rendered):
    text = json.dumps(rendered["cpu"])
    assert "nvidia.com/gpu" not in text and "recsys-gpu" not in text

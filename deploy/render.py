"""Renders the Kustomize overlays without a ``kustomize`` binary.

The test suite must check the manifests on machines that have no
``kustomize``/``kubectl`` (none installs from PyPI without downloading a
binary at run time), so this module implements the small subset of
Kustomize that ``deploy/k8s`` uses, and nothing more:

- ``resources``: YAML files and directories holding a ``kustomization.yaml``;
- ``namespace``: set on every resource;
- ``patches``: strategic-merge patches from ``path`` (target = the patch's
  own kind and name), with Kubernetes' merge keys for the lists we patch
  (``containers``/``initContainers``/``env``/``volumes`` by ``name``,
  ``volumeMounts`` by ``mountPath``, ``ports`` by ``containerPort``; other
  lists are replaced; ``null`` deletes a key; merged lists put the patch's
  items first, as Kubernetes does);
- ``images``: ``newName`` / ``newTag`` / ``digest`` for containers and init
  containers of every workload.

Anything else in a ``kustomization.yaml`` is an error rather than silently
ignored. When ``kubectl`` is installed, ``tests/unit/test_deploy_k8s.py``
checks that this renderer and ``kubectl kustomize`` produce the same objects.

    python deploy/render.py deploy/k8s/overlays/cpu > recsys.yaml
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches", "images"}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot (or must not) build."""


def _load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """Strategic-merge ``patch`` into ``base`` (returns a new object)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    key = MERGE_KEYS.get(field or "")
    if isinstance(base, list) and isinstance(patch, list) and key:
        # As in Kubernetes' strategic merge: the patch's items come first, in
        # patch order (merged with their base item), then the untouched base
        # items. Order matters for env, where $(VAR) sees only earlier ones.
        by_key = {x.get(key): x for x in base}
        patched = [merge(by_key[p[key]], p) if p.get(key) in by_key else p for p in patch]
        keys = {p.get(key) for p in patch}
        return [copy.deepcopy(x) for x in patched] + [
            copy.deepcopy(x) for x in base if x.get(key) not in keys
        ]
    return copy.deepcopy(patch)


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template", {}).get("spec")
    return [template] if template else []


def _split_image(image: str) -> tuple[str, str]:
    """``name[:tag][@digest]`` -> (name, the rest including its separator)."""
    at = image.find("@")
    head, digest = (image, "") if at < 0 else (image[:at], image[at:])
    colon = head.rfind(":")
    if colon > head.rfind("/"):
        return head[:colon], head[colon:] + digest
    return head, digest


def _set_images(docs: list[dict[str, Any]], images: list[dict[str, Any]]) -> None:
    for doc in docs:
        for pod in _pod_specs(doc):
            for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
                name, suffix = _split_image(c["image"])
                for rule in images:
                    if rule["name"] != name:
                        continue
                    if rule.get("digest"):
                        suffix = "@" + rule["digest"]
                    elif rule.get("newTag"):
                        suffix = ":" + str(rule["newTag"])
                    c["image"] = rule.get("newName", name) + suffix


def build(directory: str | Path) -> list[dict[str, Any]]:
    """Builds the kustomization in ``directory`` into a list of objects.

    Raises:
        KustomizeError: On a field outside the supported subset, a missing
            file, a duplicate object or a patch whose target does not exist.
    """
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")

    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs.extend(build(path))
        elif path.is_file():
            docs.extend(_load_docs(path))
        else:
            raise KustomizeError(f"{kfile}: resource {entry} not found")
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        if _key(doc) in seen:
            raise KustomizeError(f"{kfile}: duplicate {_key(doc)}")
        seen.add(_key(doc))

    for entry in spec.get("patches", []):
        if set(entry) != {"path"}:
            raise KustomizeError(f"{kfile}: only `patches: - path: FILE` is supported")
        for patch in _load_docs(directory / entry["path"]):
            index = next((i for i, d in enumerate(docs) if _key(d) == _key(patch)), None)
            if index is None:
                raise KustomizeError(f"{kfile}: patch target {_key(patch)} not found")
            docs[index] = merge(docs[index], patch)

    if "namespace" in spec:
        for doc in docs:
            doc["metadata"]["namespace"] = spec["namespace"]
    _set_images(docs, spec.get("images", []))
    return docs


def main(argv: list[str] | None = None) -> int:
    """Prints the rendered overlay as a YAML stream."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python deploy/render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        docs = build(args[0])
    except (KustomizeError, OSError, yaml.YAMLError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

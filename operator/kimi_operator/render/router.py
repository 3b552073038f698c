"""Pure builders for a LoraServer's router: its Deployment, Service and RBAC.

The router reads its LoraServer (names, keys' references, sampling defaults, adapter states) and
watches the engine pods; its Role allows exactly that. API keys reach it as mounted Secret files,
so neither the router nor the operator needs the right to read Secrets, and a rotated key takes
effect when the kubelet refreshes the mount, without a restart.
"""

from __future__ import annotations

from typing import Any

from kimi_operator.api.base import GROUP
from kimi_operator.api.loraserver import KIND, LoraServerSpec
from kimi_operator.render.labels import bounded, common
from kimi_operator.render.loraserver import ENGINE
from kimi_operator.render.owner import Owner

ROUTER = "router"
HTTP_PORT = 8000
METRICS_PORT = 9090
KEYS_MOUNT = "/keys"


def router_name(owner: str) -> str:
    return bounded(f"{owner}-router", 63)


def endpoint(namespace: str, owner: str) -> str:
    """The in-cluster URL clients give the OpenAI client as its base URL."""
    return f"http://{router_name(owner)}.{namespace}.svc:{HTTP_PORT}/v1"


def engine_selector(owner: str) -> str:
    labels = {**common(KIND, owner), "app.kubernetes.io/component": ENGINE}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def labels(owner: str) -> dict[str, str]:
    return {**common(KIND, owner), "app.kubernetes.io/component": ROUTER}


def rbac(owner: Owner) -> list[dict[str, Any]]:
    name = router_name(owner.name)
    meta = owner.metadata(name, ROUTER)
    rules: list[dict[str, Any]] = [
        {"apiGroups": [GROUP], "resources": [owner.plural], "resourceNames": [owner.name], "verbs": ["get"]},
        # Pods cannot be listed by name: the namespace's pods, filtered by the engines' labels.
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
        },
    ]


def service(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(router_name(owner.name), ROUTER),
        "spec": {
            "selector": labels(owner.name),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"},
            ],
        },
    }


def _key_volumes(spec: LoraServerSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One Secret volume per Secret the keys name, at <KEYS_MOUNT>/<secret>."""
    secrets = sorted({k.secret_key_ref.name for k in spec.router.api_keys})
    volumes, mounts = [], []
    for i, secret in enumerate(secrets):
        volume = f"key-{i}"
        volumes.append({"name": volume, "secret": {"secretName": secret, "defaultMode": 0o440}})
        mounts.append({"name": volume, "mountPath": f"{KEYS_MOUNT}/{secret}", "readOnly": True})
    return volumes, mounts


def deployment(owner: Owner, spec: LoraServerSpec, *, image: str) -> dict[str, Any]:
    name = router_name(owner.name)
    pod_labels = labels(owner.name)
    volumes, mounts = _key_volumes(spec)
    resources = {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}}
    container = {
        "name": ROUTER,
        "image": image,
        "command": ["kimi-operator"],
        "args": [
            "router",
            f"--loraserver={owner.namespace}/{owner.name}",
            f"--engine-selector={engine_selector(owner.name)}",
            "--host=$(POD_IP)",
            f"--port={HTTP_PORT}",
            f"--metrics-port={METRICS_PORT}",
            f"--keys-dir={KEYS_MOUNT}",
        ],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": resources,
        # Ready only while the router knows a ready engine replica: a Service then sends nothing
        # to a router that could only answer 503.
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owner.metadata(name, ROUTER),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": pod_labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                # spec.podMetadata is for the engine pods (GPU scheduling, ...), not the router's.
                "metadata": {"labels": pod_labels},
                "spec": {
                    "serviceAccountName": name,
                    "containers": [container],
                    "volumes": volumes,
                    # Streams in progress get time to end after the Service stopped sending new ones.
                    "terminationGracePeriodSeconds": 60,
                },
            },
        },
    }

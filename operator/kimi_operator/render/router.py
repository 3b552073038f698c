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
from kimi_operator.render.loraserver import engine_selector, pod_metadata
from kimi_operator.render.owner import Owner, account

ROUTER = "router"
HTTP_PORT = 8000
METRICS_PORT = 9090
KEYS_MOUNT = "/keys"


def router_name(owner: str) -> str:
    return bounded(f"{owner}-router", 63)


def endpoint(namespace: str, owner: str) -> str:
    """The in-cluster URL clients give the OpenAI client as its base URL."""
    return f"http://{router_name(owner)}.{namespace}.svc:{HTTP_PORT}/v1"


def labels(owner: str) -> dict[str, str]:
    return common(KIND, owner, ROUTER)


def rbac(owner: Owner) -> list[dict[str, Any]]:
    name = router_name(owner.name)
    rules: list[dict[str, Any]] = [
        {"apiGroups": [GROUP], "resources": [owner.plural], "resourceNames": [owner.name], "verbs": ["get"]},
        # Pods cannot be listed by name: the namespace's pods, filtered by the engines' labels.
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    ]
    return account(owner, name, ROUTER, rules)


def service(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(router_name(owner.name), ROUTER),
        "spec": {
            "selector": labels(owner.name),
            # Clients only: the metrics (adapter names, key ids, traffic per key) are scraped from
            # the pods (the chart's PodMonitor), not offered to whoever reaches the endpoint.
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http"}],
        },
    }


# The router image's user; the key files are its group's (fsGroup), readable by nobody else.
RUN_AS = 65532


def _key_volumes(spec: LoraServerSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One Secret volume per Secret the keys name, at <KEYS_MOUNT>/<secret>, holding only the keys
    named. Optional: a missing Secret or key does not hold the pod in ContainerCreating; the router
    starts, refuses every request (keys are configured, none readable) and logs which is missing."""
    by_secret: dict[str, set[str]] = {}
    for k in spec.router.api_keys:
        by_secret.setdefault(k.secret_key_ref.name, set()).add(k.secret_key_ref.key)
    volumes, mounts = [], []
    for i, secret in enumerate(sorted(by_secret)):
        volume = f"key-{i}"
        items = [{"key": key, "path": key} for key in sorted(by_secret[secret])]
        volumes.append(
            {"name": volume, "secret": {"secretName": secret, "items": items, "defaultMode": 0o440, "optional": True}}
        )
        mounts.append({"name": volume, "mountPath": f"{KEYS_MOUNT}/{secret}", "readOnly": True})
    return volumes, mounts


def deployment(owner: Owner, spec: LoraServerSpec, *, image: str) -> dict[str, Any]:
    name = router_name(owner.name)
    pod_labels = labels(owner.name)
    volumes, mounts = _key_volumes(spec)
    r = spec.router.resources
    resources = {
        "requests": {"cpu": str(r.cpu), "memory": str(r.memory)},
        "limits": {"cpu": str(r.cpu), "memory": str(r.memory)},
    }
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
            # llama-server lists adapters by file and takes them by id (REFERENCE.md).
            *(["--engine-api=llamacpp"] if spec.engine.type == "llamacpp" else []),
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
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
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
                # spec.podMetadata is for the engine pods (GPU scheduling, ...); the router's are
                # spec.router.podMetadata. The owner's full name rides in an annotation (labels are
                # bounded), so a router pod's change runs a pass of its LoraServer.
                "metadata": pod_metadata(owner, spec.router.pod_metadata, pod_labels),
                "spec": {
                    "serviceAccountName": name,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "fsGroup": RUN_AS,
                    },
                    "containers": [container],
                    "volumes": volumes,
                    # On SIGTERM the router answers /ready 503 for --drain-delay seconds (the Service
                    # stops sending to it), then stops accepting and lets answers in progress end.
                    "terminationGracePeriodSeconds": 60,
                },
            },
        },
    }

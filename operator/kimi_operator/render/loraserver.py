"""Pure builders for a LoraServer's children: the serving plan, the engine StatefulSets, their
Service and the agents' RBAC.

Shared replicas are one StatefulSet whose pod template does not depend on the adapters, so adding
or removing an adapter never restarts a pod: the agents load and unload through the engine's API,
following the plan ConfigMap. Each expert adapter gets a StatefulSet of its own, because sglang-kt
loads expert LoRA only at start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from kimi_operator.api.base import GROUP, PodMetadata
from kimi_operator.api.loraserver import KIND, PLURAL, LoraServerSpec
from kimi_operator.api.serving import GGUF_ADAPTER_FILE, PLAN_KEY, ServingPlan
from kimi_operator.render import llamacpp, sglang
from kimi_operator.render.jobs import template_metadata
from kimi_operator.render.kimimodel import READY, model_label
from kimi_operator.render.kimimodel_paths import MOUNT
from kimi_operator.render.labels import bounded, common, selector
from kimi_operator.render.owner import Owner, account, status_rule
from kimi_operator.render.quantity import parse_quantity

ENGINE = "engine"
CACHE_MOUNT = "/adapter-cache"
# Node-local adapter cache under the model storage, keyed by sha256: shared by every LoraServer
# whose model lives on that storage.
CACHE_DIR = "adapter-cache"
STORE_MOUNT = "/adapter-store"
SOURCE_MOUNT = "/source"
REPLICA_KIND_LABEL = f"{GROUP}/replica-kind"
ADAPTER_LABEL = f"{GROUP}/adapter"
OWNER_ANNOTATION = f"{GROUP}/loraserver"
# StatefulSet pods are named <set>-<ordinal> and carry a controller-revision-hash label
# "<set>-<hash>": the set's name must leave room for both within 63 characters.
_MAX_SET_NAME = 52


def owner(namespace: str, name: str, uid: str) -> Owner:
    return Owner(KIND, PLURAL, namespace, name, uid)


def _name(owner: str, suffix: str, limit: int = 63) -> str:
    return bounded(f"{owner}-{suffix}", limit)


def shared_set_name(owner: str) -> str:
    return _name(owner, "shared", _MAX_SET_NAME)


def expert_set_name(owner: str, adapter: str) -> str:
    """A DNS label: adapter names may hold '_' and '.', which pod hostnames may not; a name that had
    to change gets a digest of the original, so two adapters never share a set."""
    safe = re.sub(r"[^a-z0-9-]", "-", adapter)
    if safe != adapter:
        safe = f"{safe}-{hashlib.sha256(adapter.encode()).hexdigest()[:6]}"
    return _name(owner, f"x-{safe}", _MAX_SET_NAME)


def replica_names(set_name: str, replicas: int) -> list[str]:
    return [f"{set_name}-{i}" for i in range(replicas)]


def plan_name(owner: str) -> str:
    return _name(owner, "plan")


def service_account_name(owner: str) -> str:
    return _name(owner, "engine")


def service_name(owner: str) -> str:
    return _name(owner, "engines")


def engine_labels(owner: str) -> dict[str, str]:
    """The labels every engine pod of this LoraServer carries (shared and expert sets alike)."""
    return common(KIND, owner, ENGINE)


def engine_selector(owner: str) -> str:
    """The engine pods (and StatefulSets) of this LoraServer."""
    return selector(engine_labels(owner))


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the engine pods need to know of the KimiModel."""

    name: str
    storage_path: str
    # The native INT4 checkpoint on the node (a path source), or None when it is under the storage.
    source_path: str | None
    # The gguf variant (llama.cpp engines): its quantization and the file to load in it.
    gguf_quantization: str | None = None
    gguf_entry: str | None = None


def gguf_model_path(namespace: str, model: ModelFacts) -> str:
    """The file llama-server is started with, in the engine pod: the quantization's first split part
    (llama.cpp finds the others beside it)."""
    assert model.gguf_quantization
    assert model.gguf_entry
    return f"{MOUNT}/{namespace}/{model.name}/gguf/{model.gguf_quantization}/{model.gguf_entry}"


def gguf_adapter_path(digest: str) -> str:
    """An adapter's GGUF file in the engine pod: its node cache entry, named by its digest."""
    return f"{CACHE_MOUNT}/{digest}/{GGUF_ADAPTER_FILE}"


def model_paths(namespace: str, model: ModelFacts) -> sglang.ModelPaths:
    root = f"{MOUNT}/{namespace}/{model.name}"
    checkpoint = SOURCE_MOUNT if model.source_path else f"{root}/int4"
    return sglang.ModelPaths(checkpoint=checkpoint, root=root)


def rbac(owner: Owner) -> list[dict[str, Any]]:
    """The agents may read the plan and report into this LoraServer's status; nothing else (a hub
    token reaches them as an environment variable, so neither they nor the operator read Secrets)."""
    rules: list[dict[str, Any]] = [
        status_rule(owner),
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [plan_name(owner.name)], "verbs": ["get"]},
    ]
    return account(owner, service_account_name(owner.name), ENGINE, rules)


def plan_config_map(owner: Owner, plan: ServingPlan) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owner.metadata(plan_name(owner.name), ENGINE),
        # Compact: a plan of many replicas and adapters must stay under a ConfigMap's 1 MiB.
        "data": {PLAN_KEY: json.dumps(plan.to_wire(), separators=(",", ":"), sort_keys=True)},
    }


def service(owner: Owner) -> dict[str, Any]:
    """A headless Service over every engine pod: stable DNS names for the router."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(service_name(owner.name), ENGINE),
        "spec": {
            "clusterIP": "None",
            "selector": engine_labels(owner.name),
            "ports": [{"name": "http", "port": sglang.ENGINE_PORT, "targetPort": sglang.ENGINE_PORT}],
        },
    }


def _probes() -> dict[str, Any]:
    # SGLang's /health runs a one-token generation unless SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION
    # is false (set on the engine): then it answers 503 while the engine starts and 200 once it
    # serves, without generating, so probing it every few seconds costs nothing. (SGLang has no
    # /ready: a real 0.5.16 engine answers it 404.) Loading a 600 GB base takes many minutes: the
    # startup probe allows an hour before the kubelet gives up.
    probe = {"httpGet": {"path": "/health", "port": sglang.ENGINE_PORT}, "timeoutSeconds": 5}
    # That /health stays 200 when the scheduler hangs (seen on a real engine): liveness asks for a
    # one-token generation instead, once a minute. It answers only once the engine returns output
    # for something, and a very long prompt's prefill returns none until it is read whole (a 256k
    # prompt at a couple of hundred tokens a second takes over 20 minutes on the CPU experts):
    # restarting a 600 GB engine for that would be far worse, so it takes 45 minutes of failures.
    alive = {"httpGet": {"path": "/health_generate", "port": sglang.ENGINE_PORT}, "timeoutSeconds": 30}
    return {
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 360},
        "readinessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {**alive, "periodSeconds": 60, "failureThreshold": 45},
    }


def _agent_args(owner: Owner, spec: LoraServerSpec, *, once: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    args = [
        "serve-agent",
        f"--report={owner.namespace}/{owner.name}",
        f"--plan={plan_name(owner.name)}",
        "--replica=$(POD_NAME)",
        "--pod-uid=$(POD_UID)",
        f"--engine=http://$(POD_IP):{sglang.ENGINE_PORT}",
        f"--models-dir={MOUNT}",
        f"--cache-dir={CACHE_MOUNT}",
    ]
    if spec.adapter_store is not None:
        args.append(f"--store-dir={STORE_MOUNT}")
    args += extra
    return [*args, "--once"] if once else args


@dataclasses.dataclass(frozen=True)
class _PodParts:
    """What every engine pod of a LoraServer has, whatever its engine: the identity environment,
    the model and cache volumes, the adapter agent and the placement on the model's nodes."""

    env: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    engine_mounts: list[dict[str, Any]]
    agent: dict[str, Any]
    affinity: dict[str, Any]


def _pod_parts(
    owner: Owner, spec: LoraServerSpec, model: ModelFacts, image: str, agent_extra: tuple[str, ...] = ()
) -> _PodParts:
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
    ]
    mounts = [
        {"name": "models", "mountPath": MOUNT, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_MOUNT},
    ]
    # The engine only reads the cache; the agent fills it.
    engine_mounts = [
        {"name": "models", "mountPath": MOUNT, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_MOUNT, "readOnly": True},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "models", "hostPath": {"path": model.storage_path, "type": "Directory"}},
        {"name": "cache", "hostPath": {"path": f"{model.storage_path}/{CACHE_DIR}", "type": "DirectoryOrCreate"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.resources.shared_memory)}},
    ]
    agent_mounts = list(mounts)
    if spec.adapter_store is not None:
        claim = spec.adapter_store.persistent_volume_claim.name
        volumes.append({"name": "adapter-store", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        agent_mounts.append({"name": "adapter-store", "mountPath": STORE_MOUNT, "readOnly": True})
    agent_resources = {"cpu": "500m", "memory": "512Mi"}
    agent_env = list(env)
    if spec.hub_endpoint is not None:
        agent_env.append({"name": "HF_ENDPOINT", "value": spec.hub_endpoint})
    if spec.hub_token_secret_ref is not None:
        token = spec.hub_token_secret_ref
        agent_env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    agent = {
        "name": "adapter-agent",
        "image": image,
        "command": ["kimi-operator"],
        "args": _agent_args(owner, spec, extra=agent_extra),
        "env": agent_env,
        "resources": {"requests": agent_resources, "limits": agent_resources},
        "volumeMounts": agent_mounts,
    }
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": model_label(owner.namespace, model.name), "operator": "In", "values": [READY]}
                        ]
                    }
                ]
            }
        }
    }
    return _PodParts(env, volumes, engine_mounts, agent, affinity)


def _engine_resources(spec: LoraServerSpec) -> dict[str, Any]:
    resources = {
        "nvidia.com/gpu": str(spec.resources.gpus),
        "cpu": str(spec.resources.cpu),
        "memory": str(spec.resources.memory),
    }
    return {"requests": resources, "limits": resources}


def _stateful_set(
    owner: Owner, spec: LoraServerSpec, *, name: str, replicas: int, labels: Mapping[str, str], pod_spec: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": owner.metadata(name, ENGINE),
        "spec": {
            "serviceName": service_name(owner.name),
            "replicas": replicas,
            # Replicas load their weights in parallel (each load takes minutes); a change of engine
            # settings (or of a llama.cpp engine's adapters) still rolls them one at a time, waiting
            # for each to be ready again.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "selector": {"matchLabels": {k: labels[k] for k in sorted(labels)}},
            "template": {"metadata": pod_metadata(owner, spec.pod_metadata, labels), "spec": pod_spec},
        },
    }


def engine_set(
    owner: Owner,
    spec: LoraServerSpec,
    model: ModelFacts,
    *,
    name: str,
    replicas: int,
    image: str,
    expert: sglang.StartAdapter | None = None,
) -> dict[str, Any]:
    """One StatefulSet of SGLang replicas: the engine container and the adapter agent beside it."""
    kind = "expert" if expert else "shared"
    labels = {**engine_labels(owner.name), REPLICA_KIND_LABEL: kind}
    if expert:
        labels[ADAPTER_LABEL] = bounded(expert.name)
    parts = _pod_parts(owner, spec, model, image)
    engine_mounts = list(parts.engine_mounts)
    volumes = list(parts.volumes)
    if model.source_path:
        volumes.append({"name": "source", "hostPath": {"path": model.source_path, "type": "Directory"}})
        engine_mounts.append({"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True})
    engine_args = sglang.launch_args(spec, model_paths(owner.namespace, model), host="$(POD_IP)", expert=expert)
    engine = {
        "name": ENGINE,
        "image": image,
        "command": ["python", "-m", "sglang.launch_server"],
        "args": engine_args,
        "env": [*parts.env, {"name": "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "value": "false"}],
        "ports": [{"name": "http", "containerPort": sglang.ENGINE_PORT}],
        "resources": _engine_resources(spec),
        "volumeMounts": [*engine_mounts, {"name": "dshm", "mountPath": "/dev/shm"}],  # noqa: S108 (shared memory)
        # The tail of its log as its termination message: an engine that cannot start (an expert
        # adapter it refuses) is reported with its own words.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        **_probes(),
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(owner.name),
        "affinity": parts.affinity,
        "containers": [engine, parts.agent],
        "volumes": volumes,
        # Unloading waits for in-flight requests of the adapter; give long generations time to end.
        "terminationGracePeriodSeconds": 120,
    }
    if expert:
        # The expert adapter must be on the node before the engine starts with it.
        pod_spec["initContainers"] = [
            {**parts.agent, "name": "fetch-adapter", "args": _agent_args(owner, spec, once=True)}
        ]
    return _stateful_set(owner, spec, name=name, replicas=replicas, labels=labels, pod_spec=pod_spec)


def _threads(spec: LoraServerSpec) -> int:
    """llama-server's threads: the setting, else the pod's CPU limit (at least one), since llama.cpp
    alone counts the host's cores, not the pod's share of them."""
    settings = spec.engine.llamacpp
    if settings is not None and settings.threads is not None:
        return settings.threads
    return max(1, int(parse_quantity(str(spec.resources.cpu))))


def llamacpp_set(
    owner: Owner,
    spec: LoraServerSpec,
    model: ModelFacts,
    *,
    name: str,
    replicas: int,
    image: str,
    adapters: list[str],
) -> dict[str, Any]:
    """One StatefulSet of llama-server replicas, each started with every adapter of the list (the
    digests of their files, in the order of their ids). llama-server loads adapters only at start:
    the list is in the pod template, so a change rolls the replicas one at a time; an init container
    brings the files into the node cache first."""
    labels = {**engine_labels(owner.name), REPLICA_KIND_LABEL: "shared"}
    settings = spec.engine.llamacpp
    options = llamacpp.ServerOptions(
        model=gguf_model_path(owner.namespace, model),
        alias=spec.served_model_name,
        adapters=tuple(gguf_adapter_path(d) for d in adapters),
        threads=_threads(spec),
        host="$(POD_IP)",
        port=sglang.ENGINE_PORT,
    )
    if settings is not None:
        options = dataclasses.replace(
            options,
            context_size=settings.context_size,
            parallel=settings.parallel,
            gpu_layers=settings.gpu_layers,
            cpu_moe_layers=settings.cpu_moe_layers,
        )
    # The server's own defaults are the LoraServer's sampling defaults, as the router's are.
    sampling = spec.sampling
    if sampling.temperature is not None:
        options = dataclasses.replace(options, temperature=sampling.temperature)
    if sampling.top_p is not None:
        options = dataclasses.replace(options, top_p=sampling.top_p)
    if sampling.min_p is not None:
        options = dataclasses.replace(options, min_p=sampling.min_p)
    # The llama.cpp image carries the agent too (kimi-operator serve-agent), as the SGLang one does.
    # Its engine is named on its command line, not taken from the plan, so an old pod's agent keeps
    # speaking its own engine's language while a switch of engine.type rolls the replicas.
    engine_api = ("--engine-api=llamacpp",)
    parts = _pod_parts(owner, spec, model, image, engine_api)
    probe = {"httpGet": {"path": "/health", "port": sglang.ENGINE_PORT}, "timeoutSeconds": 5}
    engine = {
        "name": ENGINE,
        "image": image,
        "command": ["llama-server"],
        "args": llamacpp.server_args(options),
        "env": parts.env,
        "ports": [{"name": "http", "containerPort": sglang.ENGINE_PORT}],
        "resources": _engine_resources(spec),
        "volumeMounts": [*parts.engine_mounts, {"name": "dshm", "mountPath": "/dev/shm"}],  # noqa: S108
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # llama-server answers /health 503 while it loads the model, 200 once it serves. A
        # quantization of hundreds of GB takes many minutes to read: an hour before giving up.
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 360},
        "readinessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 30, "failureThreshold": 10},
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(owner.name),
        "affinity": parts.affinity,
        # Every adapter on the node before the engine starts with it: exactly the files of this pod's
        # command line (the plan may already name others while the replicas roll).
        "initContainers": [
            {
                **parts.agent,
                "name": "fetch-adapters",
                "args": _agent_args(
                    owner, spec, once=True, extra=(*engine_api, f"--adapter-digests={','.join(adapters)}")
                ),
            }
        ],
        "containers": [engine, parts.agent],
        "volumes": parts.volumes,
        "terminationGracePeriodSeconds": 120,
    }
    return _stateful_set(owner, spec, name=name, replicas=replicas, labels=labels, pod_spec=pod_spec)


def pod_metadata(owner: Owner, user: PodMetadata, labels: Mapping[str, str]) -> dict[str, Any]:
    """A pod of this LoraServer: the user's labels and annotations, ours taking precedence."""
    meta = template_metadata(user, labels)
    # Label values are bounded (a long name is hashed): the owner's full name rides in an annotation,
    # so a pod event finds its LoraServer.
    meta["annotations"] = {**meta["annotations"], OWNER_ANNOTATION: owner.name}
    return meta

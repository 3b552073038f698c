"""A LoraServer's router: its Deployment, Service and RBAC, and the contract with the router's own
code (which may import only ``api``, so the names both sides use are pinned together here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kimi_operator.api.loraserver import LoraServerSpec
from kimi_operator.render import loraserver as engine_render
from kimi_operator.render import router as render
from kimi_operator.router import config as router_config
from kimi_operator.router import main as router_main
from kimi_operator.router import sources

OWNER = engine_render.owner("ml", "serve", "uid-1")


def spec(**overrides: Any) -> LoraServerSpec:
    return LoraServerSpec.model_validate({"model": {"name": "kimi"}, **overrides})


def keys(*entries: tuple[str, str, str, list[str]]) -> dict[str, Any]:
    return {
        "apiKeys": [
            {"id": i, "secretKeyRef": {"name": secret, "key": key}, "models": models}
            for i, secret, key, models in entries
        ]
    }


def test_the_router_pod_runs_the_router_of_this_loraserver_on_its_pod_ip() -> None:
    deployment = render.deployment(OWNER, spec(router={"replicas": 3}), image="router:1")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "router:1"
    assert container["command"] == ["kimi-operator"]
    args = container["args"]
    assert args[0] == "router"
    assert "--loraserver=ml/serve" in args
    assert "--host=$(POD_IP)" in args
    # The arguments parse with the router's own parser.
    parsed = router_main.parser().parse_args(args[1:])
    assert parsed.loraserver == "ml/serve"
    assert parsed.port == render.HTTP_PORT
    assert parsed.metrics_port == render.METRICS_PORT
    assert str(parsed.keys_dir) == render.KEYS_MOUNT == router_config.KEYS_MOUNT
    # The selector the router watches is the engine pods' labels.
    engines = engine_render.engine_set(
        OWNER,
        spec(),
        engine_render.ModelFacts(name="kimi", storage_path="/mnt", source_path=None),
        name="serve-shared",
        replicas=1,
        image="e",
    )
    engine_labels = engines["spec"]["template"]["metadata"]["labels"]
    selector = dict(p.split("=", 1) for p in parsed.engine_selector.split(","))
    assert selector.items() <= engine_labels.items()
    assert sources.REPLICA_KIND_LABEL == engine_render.REPLICA_KIND_LABEL
    # Readiness is the router's own /ready (false while it knows no ready engine).
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod["serviceAccountName"] == "serve-router"
    # Selector and pod labels agree, and name only the router pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert labels["app.kubernetes.io/component"] == "router"


def test_each_secret_a_key_names_is_mounted_once_where_the_router_reads_it() -> None:
    s = spec(router=keys(("a", "team", "a", ["kimi-k2.5"]), ("b", "team", "b", ["*"]), ("c", "ops", "k", ["x"])))
    pod = render.deployment(OWNER, s, image="r")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
    assert sorted(secrets.values()) == ["ops", "team"]
    # Only the keys named, readable by the router's group (its image's user, the pod's fsGroup)
    # and nobody else; a missing Secret does not keep the pod from starting (the router refuses all).
    for volume in pod["volumes"]:
        secret = volume["secret"]
        assert secret["defaultMode"] == 0o440
        assert secret["optional"] is True
    items = {v["secret"]["secretName"]: [i["key"] for i in v["secret"]["items"]] for v in pod["volumes"]}
    assert items == {"ops": ["k"], "team": ["a", "b"]}
    context = pod["securityContext"]
    assert context["runAsUser"] == context["fsGroup"] == render.RUN_AS
    assert context["runAsNonRoot"] is True
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {secrets[n]: p for n, p in mounts.items()} == {"ops": "/keys/ops", "team": "/keys/team"}
    # The router's own reading of the spec finds the same files.
    config = router_config.from_object({"spec": s.to_wire()})
    assert sorted(str(k.file(Path("/keys"))) for k in config.keys) == ["/keys/ops/k", "/keys/team/a", "/keys/team/b"]


def test_the_router_may_read_its_loraserver_and_the_pods_and_no_secret() -> None:
    sa, role, binding = render.rbac(OWNER)
    assert sa["kind"] == "ServiceAccount"
    rules = role["rules"]
    assert {
        "apiGroups": ["kimi-operator.io"],
        "resources": ["loraservers"],
        "resourceNames": ["serve"],
        "verbs": ["get"],
    } in rules
    assert all("secrets" not in r["resources"] for r in rules)
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in rules)
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]} in rules
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_the_service_and_the_endpoint_name_the_same_port() -> None:
    service = render.service(OWNER)
    assert service["metadata"]["name"] == "serve-router"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    # Clients only: metrics name adapters and key ids, and are scraped from the pods.
    assert ports == {"http": render.HTTP_PORT}
    assert render.endpoint("ml", "serve") == f"http://serve-router.ml.svc:{render.HTTP_PORT}/v1"
    assert service["spec"]["selector"] == render.labels("serve")


def test_the_router_pods_carry_the_users_metadata_under_ours() -> None:
    wanted = {"labels": {"team": "ml", "app.kubernetes.io/component": "mine"}, "annotations": {"a": "1"}}
    template = render.deployment(OWNER, spec(router={"podMetadata": wanted}), image="r:1")["spec"]["template"]
    meta = template["metadata"]
    assert meta["labels"]["team"] == "ml"
    assert meta["labels"]["app.kubernetes.io/component"] == render.labels("serve")["app.kubernetes.io/component"]
    assert meta["annotations"]["a"] == "1"
    assert meta["annotations"][engine_render.OWNER_ANNOTATION] == "serve"
    # The engine pods' metadata is not the router's.
    plain = render.deployment(OWNER, spec(podMetadata=wanted), image="r:1")["spec"]["template"]["metadata"]
    assert "team" not in plain["labels"]
    assert "a" not in plain["annotations"]

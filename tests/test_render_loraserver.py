"""A LoraServer's layout (sets, replicas, plan) and its engine StatefulSets."""

from __future__ import annotations

from typing import Any

from kimi_operator.api.loraserver import LoraServerSpec
from kimi_operator.api.serving import AdapterFiles
from kimi_operator.controller.loraserver import Resolved, layout
from kimi_operator.render import loraserver as render
from kimi_operator.render.kimimodel import model_label

OWNER = render.owner("ml", "serve", "uid-1")
MODEL = render.ModelFacts(name="kimi", storage_path="/mnt/nvme", source_path=None)
SHA = "a" * 64


def spec(**overrides: Any) -> LoraServerSpec:
    return LoraServerSpec.model_validate({"model": {"name": "kimi"}, **overrides})


def resolved(s: LoraServerSpec, name: str, *, expert: bool = False, sha: str = SHA) -> Resolved:
    adapter = next(a for a in s.adapters if a.name == name)
    files = AdapterFiles(kind="node", path=f"ml/kimi/finetune/{name}/adapter")
    return Resolved(adapter, expert, files, sha, f"FineTuneJob {name}")


def adapters(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "fineTuneJob": {"name": n}} for n in names]


def test_shared_adapters_go_to_the_shared_replicas_and_an_expert_adapter_gets_its_own() -> None:
    s = spec(replicas=2, adapters=adapters("a", "b", "x"))
    result = layout("serve", 3, s, [resolved(s, "a"), resolved(s, "b"), resolved(s, "x", expert=True)], "/cache")
    assert result.sets == {
        "serve-shared": (2, None),
        "serve-x-x": (1, render.sglang.StartAdapter("x", f"/cache/{SHA}")),
    }
    assert result.desired == ["serve-shared-0", "serve-shared-1", "serve-x-x-0"]
    plans = {r.replica: r for r in result.plan.replicas}
    assert [a.name for a in plans["serve-shared-0"].adapters] == ["a", "b"]
    assert plans["serve-x-x-0"].expert
    assert [a.name for a in plans["serve-x-x-0"].adapters] == ["x"]
    kinds = {w.name: (w.kind, w.placed) for w in result.wanted}
    assert kinds == {
        "a": ("Shared", ("serve-shared-0", "serve-shared-1")),
        "b": ("Shared", ("serve-shared-0", "serve-shared-1")),
        "x": ("Expert", ("serve-x-x-0",)),
    }
    assert result.plan.generation == 3


def test_an_adapter_whose_source_is_not_ready_is_in_no_plan() -> None:
    s = spec(adapters=adapters("a"))
    waiting = Resolved(s.adapters[0], None, None, None, "FineTuneJob a", ("Pending", "waiting"))
    result = layout("serve", 1, s, [waiting], "/cache")
    assert all(not r.adapters for r in result.plan.replicas)
    assert result.wanted[0].blocked == ("Pending", "waiting")
    assert result.wanted[0].kind == "Unknown"


def sets_for(s: LoraServerSpec, names: list[str]) -> dict[str, Any]:
    """The shared StatefulSet the operator would apply, through the same layout as the controller."""
    result = layout("serve", 1, s, [resolved(s, n) for n in names], "/cache")
    count, start = result.sets["serve-shared"]
    return render.engine_set(OWNER, s, MODEL, name="serve-shared", replicas=count, image="engine:1", expert=start)


def test_the_shared_pod_template_does_not_depend_on_the_adapters() -> None:
    # Adding or removing an adapter must never restart a shared replica.
    few = sets_for(spec(replicas=2, adapters=adapters("a")), ["a"])
    many = sets_for(spec(replicas=2, adapters=adapters("a", "b", "c")), ["a", "b", "c"])
    assert few["spec"]["template"] == many["spec"]["template"]


def test_an_engine_setting_changes_the_template_and_rolls_one_at_a_time() -> None:
    one = sets_for(spec(replicas=2), [])
    other = sets_for(spec(replicas=2, engine={"maxLoraRank": 128}), [])
    assert one["spec"]["template"] != other["spec"]["template"]
    assert one["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_engine_pods_are_pinned_to_nodes_holding_the_model_and_probed_cheaply() -> None:
    pod = sets_for(spec(replicas=1), [])["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": model_label("ml", "kimi"), "operator": "In", "values": ["ready"]}]
    engine, agent = pod["containers"]
    for probe in ("startupProbe", "readinessProbe"):
        # /health, told not to generate (SGLang has no /ready).
        assert engine[probe]["httpGet"]["path"] == "/health"
    # A hung scheduler leaves /health at 200: liveness generates one token, once a minute.
    assert engine["livenessProbe"]["httpGet"]["path"] == "/health_generate"
    assert engine["livenessProbe"]["periodSeconds"] >= 60
    # A long prefill answers nothing for many minutes: no restart before 45 minutes of failures.
    assert engine["livenessProbe"]["periodSeconds"] * engine["livenessProbe"]["failureThreshold"] >= 45 * 60
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "false"
    assert engine["startupProbe"]["periodSeconds"] * engine["startupProbe"]["failureThreshold"] >= 3600
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "--kt-weight-path" in engine["args"]
    assert engine["args"][engine["args"].index("--kt-weight-path") + 1] == "/models/ml/kimi/cpu-int8"
    assert engine["args"][engine["args"].index("--model-path") + 1] == "/models/ml/kimi/int4"
    assert agent["args"][0] == "serve-agent"
    assert "--replica=$(POD_NAME)" in agent["args"]
    assert "initContainers" not in pod


def test_an_expert_replica_fetches_its_adapter_before_the_engine_starts_with_it() -> None:
    s = spec(adapters=adapters("x"))
    start = render.sglang.StartAdapter("x", f"/adapter-cache/{SHA}")
    pod = render.engine_set(OWNER, s, MODEL, name="serve-x-x", replicas=1, image="engine:1", expert=start)
    template = pod["spec"]["template"]
    (init,) = template["spec"]["initContainers"]
    assert "--once" in init["args"]
    engine = template["spec"]["containers"][0]
    assert engine["args"][engine["args"].index("--lora-paths") + 1] == f"x=/adapter-cache/{SHA}"
    assert template["metadata"]["labels"][render.REPLICA_KIND_LABEL] == "expert"


def test_the_agents_may_read_the_plan_and_report_and_nothing_else() -> None:
    _, role, _ = render.rbac(OWNER)
    rules = {tuple(r["resources"]): r for r in role["rules"]}
    assert set(rules) == {("configmaps",), ("loraservers/status",)}
    assert rules[("configmaps",)]["resourceNames"] == ["serve-plan"]
    assert rules[("configmaps",)]["verbs"] == ["get"]
    assert rules[("loraservers/status",)]["resourceNames"] == ["serve"]


def test_the_hub_token_reaches_the_agent_as_an_environment_variable() -> None:
    s = spec(hubTokenSecretRef={"name": "hf", "key": "token"})
    pod = render.engine_set(OWNER, s, MODEL, name="serve-shared", replicas=1, image="engine:1")["spec"]["template"]
    engine, agent = pod["spec"]["containers"]
    token = next(e for e in agent["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert all(e["name"] != "HF_TOKEN" for e in engine["env"])


def test_set_names_leave_room_for_pod_ordinals_and_revision_hashes() -> None:
    name = render.expert_set_name("s" * 63, "adapter-with-a-long-name")
    assert len(name) <= 52


def test_an_expert_replicas_pool_takes_its_adapters_rank() -> None:
    s = spec(adapters=adapters("x"), engine={"maxLoraRank": 16})
    big = render.sglang.StartAdapter("x", f"/adapter-cache/{SHA}", rank=64)
    args = render.sglang.launch_args(s, render.model_paths("ml", MODEL), host="h", expert=big)
    assert args[args.index("--max-lora-rank") + 1] == "64"
    small = render.sglang.StartAdapter("x", f"/adapter-cache/{SHA}", rank=8)
    args = render.sglang.launch_args(s, render.model_paths("ml", MODEL), host="h", expert=small)
    assert args[args.index("--max-lora-rank") + 1] == "16"

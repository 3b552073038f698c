"""A LoraServer with engine.type llamacpp: which adapters its llama-server replicas start with, how
they are started, and what its status says (pure: no cluster)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kimi_operator.api.loraserver import LoraServerSpec
from kimi_operator.api.serving import AdapterFiles
from kimi_operator.controller.loraserver import Resolved, for_llamacpp, llamacpp_layout
from kimi_operator.controller.loraserver_status import Replica, observe
from kimi_operator.render import loraserver as render
from kimi_operator.render import router as router_render
from kimi_operator.router import config as router_config

OWNER = render.owner("ml", "serve", "uid-1")
MODEL = render.ModelFacts(
    name="kimi",
    storage_path="/mnt/nvme",
    source_path=None,
    gguf_quantization="UD-TQ1_0",
    gguf_entry="Kimi-K2.5-UD-TQ1_0-00001-of-00005.gguf",
)
SHA_A, SHA_B, GGUF = "a" * 64, "b" * 64, "c" * 64


def spec(**overrides: Any) -> LoraServerSpec:
    engine = {"type": "llamacpp", **overrides.pop("engine", {})}
    return LoraServerSpec.model_validate({"model": {"name": "kimi"}, "engine": engine, **overrides})


def exported(s: LoraServerSpec, name: str, *, expert: bool = False, node: str | None = None, **facts: Any) -> Resolved:
    """An adapter of the spec as its FineTuneJob's export reports it: by default one llama.cpp
    applies whole, with its GGUF file, on every node (``node``: only there)."""
    adapter = next(a for a in s.adapters if a.name == name)
    files = AdapterFiles(kind="node", path=f"ml/kimi/finetune/{name}/adapter", node=node)
    defaults: dict[str, Any] = {"dropped": (), "gguf_sha256": GGUF, "gguf_error": None}
    sha = facts.pop("sha", SHA_A)
    return Resolved(adapter, expert, files, sha, f"FineTuneJob {name}", **{**defaults, **facts})


def adapters(*names: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": n, "fineTuneJob": {"name": n}, **extra} for n in names]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    accept: bool
    facts: dict[str, Any]
    state: str | None  # None: served
    words: tuple[str, ...] = ()
    expert: bool = False
    ready_nodes: frozenset[str] = frozenset({"n1"})


CASES = [
    Case("whole", False, {}, None),
    Case(
        "mla-targets",
        False,
        {"dropped": ("kv_b_proj", "q_a_proj")},
        "Failed",
        ("kv_b_proj (llama.cpp's convert_lora_to_gguf.py cannot convert it)", "q_a_proj", "acceptDroppedModules"),
    ),
    Case("mla-targets-accepted", True, {"dropped": ("kv_b_proj", "q_a_proj")}, None),
    Case("experts", False, {"dropped": ("experts",)}, "Failed", ("routed-expert LoRA",)),
    Case(
        "no-gguf",
        False,
        {"gguf_sha256": None, "gguf_error": "no converter in this image"},
        "Unavailable",
        ("no adapter.gguf", "no converter in this image"),
    ),
    Case("old-export", False, {"gguf_sha256": None, "dropped": None}, "Unavailable", ("predates GGUF conversion",)),
    # An expert adapter whose loss is accepted is served without its experts, beside the others.
    Case("expert-accepted", True, {"dropped": ("experts",)}, None, expert=True),
    # Its files on one node while the model is on two: a replica elsewhere could not start at all.
    Case(
        "one-node",
        False,
        {"node": "n1"},
        "Unavailable",
        ("only on node n1", "n2", "spec.output.publish"),
        ready_nodes=frozenset({"n1", "n2"}),
    ),
    Case("one-node-one-model-node", False, {"node": "n1"}, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_an_adapter_llamacpp_would_cut_short_is_refused_unless_accepted(case: Case) -> None:
    s = spec(adapters=adapters(case.name, acceptDroppedModules=case.accept))
    judged = for_llamacpp(exported(s, case.name, expert=case.expert, **case.facts), case.ready_nodes)
    if case.state is None:
        assert judged.blocked is None
        assert judged.expert is False  # served beside the others, experts or not
    else:
        assert judged.blocked is not None
        assert judged.blocked[0] == case.state
        for words in case.words:
            assert words in judged.blocked[1]


def test_every_replica_starts_with_every_adapter_it_can_serve() -> None:
    s = spec(replicas=2, adapters=[*adapters("a", "b"), *adapters("cut")])
    result = llamacpp_layout(
        "serve",
        4,
        s,
        [exported(s, "a"), exported(s, "b", sha=SHA_B), exported(s, "cut", dropped=("q_b_proj",))],
    )
    assert result.sets == {"serve-shared": (2, None)}
    assert result.llamacpp_adapters == [SHA_A, SHA_B]
    # The agents check adapter.gguf against the export's digest before the engine starts.
    assert {a.gguf_sha256 for r in result.plan.replicas for a in r.adapters} == {GGUF}
    assert result.plan.engine == "llamacpp"
    assert result.plan.generation == 4
    assert [[a.name for a in r.adapters] for r in result.plan.replicas] == [["a", "b"], ["a", "b"]]
    wanted = {w.name: w for w in result.wanted}
    assert wanted["a"].placed == ("serve-shared-0", "serve-shared-1")
    assert wanted["a"].at_start
    assert wanted["cut"].placed == ()
    assert wanted["cut"].blocked is not None


def engines(s: LoraServerSpec, digests: list[str]) -> dict[str, Any]:
    return render.llamacpp_set(OWNER, s, MODEL, name="serve-shared", replicas=2, image="llamacpp:1", adapters=digests)


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name)
    return found


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_llama_server_starts_on_the_gguf_entry_with_each_adapter_at_scale_zero() -> None:
    s = spec(resources={"cpu": "48", "memory": "400Gi", "gpus": 1})
    args = container(engines(s, [SHA_A, SHA_B]), "engine")["args"]
    assert flag(args, "-m") == "/models/ml/kimi/gguf/UD-TQ1_0/Kimi-K2.5-UD-TQ1_0-00001-of-00005.gguf"
    assert flag(args, "--lora-scaled") == (
        f"/adapter-cache/{SHA_A}/adapter.gguf:0,/adapter-cache/{SHA_B}/adapter.gguf:0"
    )
    assert flag(args, "--alias") == "kimi-k2.5"
    # The pod's CPU limit, not the host's cores; and on the pod's own address, at the engine port.
    assert flag(args, "-t") == "48"
    assert (flag(args, "--host"), flag(args, "--port")) == ("$(POD_IP)", "30000")
    assert "--cpu-moe" in args
    assert (flag(args, "--temp"), flag(args, "--top-p"), flag(args, "--min-p")) == ("1.0", "0.95", "0.01")


def test_llamacpp_settings_and_sampling_defaults_reach_the_command_line() -> None:
    s = spec(
        engine={"llamacpp": {"contextSize": 8192, "parallel": 2, "threads": 12, "gpuLayers": 30, "cpuMoeLayers": 20}},
        sampling={"temperature": 0.6},
    )
    args = container(engines(s, []), "engine")["args"]
    assert (flag(args, "-c"), flag(args, "-np"), flag(args, "-t")) == ("16384", "2", "12")
    assert (flag(args, "-ngl"), flag(args, "--n-cpu-moe")) == ("30", "20")
    assert "--cpu-moe" not in args
    assert "--lora-scaled" not in args
    assert flag(args, "--temp") == "0.6"


def test_a_change_of_adapters_changes_the_template_so_the_replicas_roll_one_at_a_time() -> None:
    s = spec()
    before, after = engines(s, [SHA_A]), engines(s, [SHA_A, SHA_B])
    assert before["spec"]["template"] != after["spec"]["template"]
    assert before["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    # Same list, same template: nothing rolls.
    assert engines(s, [SHA_A]) == before


def test_two_names_for_the_same_files_are_not_both_served() -> None:
    s = spec(adapters=adapters("a", "twin"))
    result = llamacpp_layout("serve", 1, s, [exported(s, "a"), exported(s, "twin")])
    assert result.llamacpp_adapters == [SHA_A]
    twin = next(w for w in result.wanted if w.name == "twin")
    assert twin.blocked is not None
    assert twin.blocked[0] == "Failed"
    assert "adapter a's" in twin.blocked[1]


def test_the_adapters_are_fetched_before_llama_server_starts_and_the_agent_reports_beside_it() -> None:
    pod = engines(spec(), [SHA_A, SHA_B])["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "llamacpp:1"
    assert "--once" in init["args"]
    # Exactly the files of this pod's command line, and its engine named, not taken from the plan.
    assert f"--adapter-digests={SHA_A},{SHA_B}" in init["args"]
    assert "--engine-api=llamacpp" in init["args"]
    agent = container(engines(spec(), [SHA_A]), "adapter-agent")
    assert "--once" not in agent["args"]
    assert "--engine-api=llamacpp" in agent["args"]
    engine = container(engines(spec(), [SHA_A]), "engine")
    assert engine["command"] == ["llama-server"]
    assert {m["mountPath"]: m.get("readOnly") for m in engine["volumeMounts"]}["/adapter-cache"] is True
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": 30000}


@pytest.mark.parametrize(("cpu", "threads"), [("48", 48), ("500m", 1), ("1.5", 1), ("2500m", 2)])
def test_threads_default_to_the_whole_cores_of_the_pods_cpu_limit(cpu: str, threads: int) -> None:
    args = container(engines(spec(resources={"cpu": cpu}), []), "engine")["args"]
    assert flag(args, "-t") == str(threads)


def test_the_router_asks_llama_server_for_its_adapter_ids() -> None:
    routers = router_render.deployment(OWNER, spec(), image="router:1")
    args = routers["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--engine-api=llamacpp" in args
    sglang = router_render.deployment(OWNER, LoraServerSpec.model_validate({"model": {"name": "kimi"}}), image="r")
    assert not any(a.startswith("--engine-api") for a in sglang["spec"]["template"]["spec"]["containers"][0]["args"])


def test_status_names_accepted_dropped_modules_and_says_why_an_adapter_waits() -> None:
    s = spec(replicas=2, adapters=adapters("a", acceptDroppedModules=True))
    result = llamacpp_layout("serve", 1, s, [exported(s, "a", dropped=("q_a_proj",))])
    replicas = {n: Replica(n, True, uid=f"u{n[-1]}") for n in result.desired}
    report = {"engineUp": True, "adapters": ["a"], "loadedSha256": {"a": SHA_A}}
    # One replica restarted with the adapter, the other not yet.
    reports = {"serve-shared-0": {**report, "podUid": "u0"}, "serve-shared-1": {"engineUp": True, "podUid": "u1"}}
    status = observe(wanted=result.wanted, desired_replicas=result.desired, replicas=replicas, reports=reports).status
    (entry,) = status["adapters"]
    assert entry["state"] == "Pending"
    assert entry["llamacppDroppedModules"] == ["q_a_proj"]
    assert "llama.cpp loads adapters only at start" in entry["message"]
    assert "serve-shared-1" in entry["message"]
    reports["serve-shared-1"] = {**report, "podUid": "u1"}
    status = observe(wanted=result.wanted, desired_replicas=result.desired, replicas=replicas, reports=reports).status
    assert status["adapters"][0]["state"] == "Loaded"


def test_an_engine_that_exits_naming_an_adapters_file_fails_that_adapter_only() -> None:
    s = spec(adapters=adapters("a", "b"))
    result = llamacpp_layout("serve", 1, s, [exported(s, "a"), exported(s, "b", sha=SHA_B)])
    crashed = f"llama_adapter_lora_init: failed to load /adapter-cache/{SHA_B}/adapter.gguf: wrong architecture"
    replicas = {"serve-shared-0": Replica("serve-shared-0", False, crashed=crashed)}
    status = observe(wanted=result.wanted, desired_replicas=result.desired, replicas=replicas, reports={}).status
    states = {a["name"]: a for a in status["adapters"]}
    assert states["b"]["state"] == "Failed"
    assert "wrong architecture" in states["b"]["message"]
    # The other is not blamed: it waits, and its message carries the engine's words.
    assert states["a"]["state"] == "Pending"
    assert "wrong architecture" in states["a"]["message"]


def test_the_router_knows_an_adapters_file_from_what_the_agents_report() -> None:
    """Also when a pass of the operator wrote no adapters into status (its model briefly not ready)."""
    obj = {
        "spec": {"model": {"name": "kimi"}, "engine": {"type": "llamacpp"}, "adapters": adapters("a")},
        "status": {"engines": [{"name": "serve-shared-0", "loadedSha256": {"a": SHA_A}}]},
    }
    config = router_config.from_object(obj)
    assert config.adapter_of_file(f"/adapter-cache/{SHA_A}/adapter.gguf") == "a"

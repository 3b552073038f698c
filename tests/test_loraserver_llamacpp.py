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

OWNER = render.owner("ml", "serve", "uid-1")
MODEL = render.ModelFacts(
    name="kimi",
    storage_path="/mnt/nvme",
    source_path=None,
    gguf_quantization="UD-TQ1_0",
    gguf_entry="UD-TQ1_0/Kimi-K2.5-UD-TQ1_0-00001-of-00005.gguf",
)
SHA_A, SHA_B, GGUF = "a" * 64, "b" * 64, "c" * 64


def spec(**overrides: Any) -> LoraServerSpec:
    engine = {"type": "llamacpp", **overrides.pop("engine", {})}
    return LoraServerSpec.model_validate({"model": {"name": "kimi"}, "engine": engine, **overrides})


def exported(s: LoraServerSpec, name: str, **facts: Any) -> Resolved:
    """An adapter of the spec as its FineTuneJob's export reports it: by default one llama.cpp
    applies whole, with its GGUF file."""
    adapter = next(a for a in s.adapters if a.name == name)
    files = AdapterFiles(kind="node", path=f"ml/kimi/finetune/{name}/adapter")
    defaults: dict[str, Any] = {"dropped": (), "gguf_sha256": GGUF, "gguf_error": None}
    return Resolved(adapter, False, files, facts.pop("sha", SHA_A), f"FineTuneJob {name}", **{**defaults, **facts})


def adapters(*names: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": n, "fineTuneJob": {"name": n}, **extra} for n in names]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    accept: bool
    facts: dict[str, Any]
    state: str | None  # None: served
    words: tuple[str, ...] = ()


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
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_an_adapter_llamacpp_would_cut_short_is_refused_unless_accepted(case: Case) -> None:
    s = spec(adapters=adapters(case.name, acceptDroppedModules=case.accept))
    judged = for_llamacpp(exported(s, case.name, **case.facts))
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
    assert flag(args, "-m") == "/models/ml/kimi/gguf/UD-TQ1_0/UD-TQ1_0/Kimi-K2.5-UD-TQ1_0-00001-of-00005.gguf"
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


def test_the_adapters_are_fetched_before_llama_server_starts_and_the_agent_reports_beside_it() -> None:
    pod = engines(spec(), [SHA_A])["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "llamacpp:1"
    assert "--once" in init["args"]
    agent = container(engines(spec(), [SHA_A]), "adapter-agent")
    assert "--once" not in agent["args"]
    engine = container(engines(spec(), [SHA_A]), "engine")
    assert engine["command"] == ["llama-server"]
    assert {m["mountPath"]: m.get("readOnly") for m in engine["volumeMounts"]}["/adapter-cache"] is True
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": 30000}


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

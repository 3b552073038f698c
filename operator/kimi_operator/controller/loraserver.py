"""The LoraServer reconcile pass: resolve each adapter's source, place adapters on replicas, write
the serving plan and the engine StatefulSets, and report what the pods and engines confirm.

The agents beside the engines do the loading; this pass never claims an adapter is loaded. A pass
over an unchanged LoraServer writes nothing (children are applied only when their digest changes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from kimi_operator.api.conditions import Verdict
from kimi_operator.api.kinds import FINE_TUNE_JOB, KIMI_MODEL, LORA_SERVER
from kimi_operator.api.loraserver import Adapter, LoraServerSpec
from kimi_operator.api.serving import AdapterFiles, PlannedAdapter, ReplicaPlan, ServingPlan
from kimi_operator.controller import pods as pods_
from kimi_operator.controller.kimimodel import cleanup_waiting, model_or_wait
from kimi_operator.controller.kube import Kube
from kimi_operator.controller.loraserver_status import LsReason, ModelState, Replica, RouterState, Wanted, observe
from kimi_operator.render import cleanup, llamacpp, placement, sglang
from kimi_operator.render import finetunejob as finetunejob_render
from kimi_operator.render import loraserver as render
from kimi_operator.render import router as router_render
from kimi_operator.render.kimimodel_paths import MOUNT
from kimi_operator.render.labels import COMPONENT, common, selector


@dataclasses.dataclass(frozen=True)
class Settings:
    engine_image: str
    router_image: str
    llamacpp_image: str


@dataclasses.dataclass(frozen=True)
class Resolved:
    """An adapter of the spec, its source looked up."""

    spec: Adapter
    expert: bool | None
    files: AdapterFiles | None
    sha256: str | None
    source: str
    blocked: tuple[str, str] | None = None
    rank: int | None = None
    # What the export says of it for llama.cpp (FineTuneJob sources): the modules a llama.cpp server
    # would not apply, and the digest of adapter.gguf or why there is none.
    dropped: tuple[str, ...] | None = None
    gguf_sha256: str | None = None
    gguf_error: str | None = None


def _under(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` when it lies under it."""
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") and len(path) > len(root) + 1 else None


def _from_fine_tune_job(
    ftjs: Mapping[str, Mapping[str, Any]], model: Mapping[str, Any], adapter: Adapter, store: str | None
) -> Resolved:
    assert adapter.fine_tune_job is not None
    ftj_name = adapter.fine_tune_job.name
    where = f"FineTuneJob {ftj_name}"
    ftj = ftjs.get(ftj_name)
    if ftj is None:
        return Resolved(adapter, None, None, None, where, ("Pending", f"{where} does not exist"))
    ftj_status = ftj.get("status") or {}
    exported = ftj_status.get("adapter")
    succeeded = ftj_status.get("phase") == "Succeeded"
    if not exported or not succeeded:
        # Served once the job has succeeded: an export reported by a pod that then fails is not.
        message = f"waiting for {where} to export its adapter (phase {ftj_status.get('phase')})"
        return Resolved(adapter, None, None, None, where, ("Pending", message))
    if ftj["spec"]["model"]["name"] != model["metadata"]["name"]:
        message = f"{where} trained on KimiModel {ftj['spec']['model']['name']}, not {model['metadata']['name']}"
        return Resolved(adapter, None, None, None, where, ("Unavailable", message))
    gguf_facts = {
        "dropped": tuple(exported["llamacppDroppedModules"])
        if exported.get("llamacppDroppedModules") is not None
        else None,
        "gguf_sha256": exported.get("ggufSha256"),
        "gguf_error": exported.get("ggufError"),
    }
    published = exported.get("published") or {}
    if store is not None and published.get("claimName") == store:
        # On the shared store: every replica can have it, whatever node it runs on.
        files = AdapterFiles(kind="store", path=str(published["path"]), node=exported["node"])
        source = f"{where}: {published['path']} on volume {store}"
    else:
        # Where the operator told the training pod to export it (its rendered --output-dir), on the
        # storage the engine pods mount at the same path: derived, not taken from the pod's report,
        # whose path is the pod's own view. The agent checks the files against the reported sha256.
        ftj_meta = ftj["metadata"]
        exported_at = finetunejob_render.adapter_dir(
            ftj_meta["namespace"], ftj["spec"]["model"]["name"], ftj_meta["name"]
        )
        source = f"{where}: {exported_at} on node {exported['node']}"
        files = AdapterFiles(kind="node", path=exported_at.removeprefix(f"{MOUNT}/"), node=exported["node"])
    return Resolved(
        adapter,
        bool(exported.get("expertLora")),
        files,
        exported.get("sha256"),
        source,
        rank=exported.get("rank"),
        **gguf_facts,
    )


def resolve(
    ftjs: Mapping[str, Mapping[str, Any]], model: Mapping[str, Any], adapter: Adapter, store: str | None = None
) -> Resolved:
    """``ftjs``: the namespace's FineTuneJobs by name (listed once per pass, not fetched per adapter)."""
    if adapter.fine_tune_job is not None:
        return _from_fine_tune_job(ftjs, model, adapter, store)
    storage = model["spec"]["storage"]["hostPath"]
    if adapter.path is not None:
        relative = _under(adapter.path, storage)
        if relative is None:
            message = (
                f"path {adapter.path} is outside the KimiModel's storage {storage}: engine pods mount only that "
                f"directory (a mount per adapter would restart them); move the adapter under {storage}"
            )
            return Resolved(adapter, adapter.expert, None, adapter.sha256, adapter.path, ("Unavailable", message))
        files = AdapterFiles(kind="node", path=relative)
        return Resolved(adapter, adapter.expert, files, adapter.sha256, f"node path {adapter.path}")
    hub = adapter.hugging_face
    assert hub is not None  # CEL: exactly one source
    files = AdapterFiles(
        kind="hub",
        repo=hub.repo,
        revision=hub.revision,
        subfolder=hub.subfolder,
        endpoint=hub.endpoint,
    )
    return Resolved(adapter, adapter.expert, files, adapter.sha256, f"hub {hub.repo}@{hub.revision}")


def for_llamacpp(r: Resolved, ready_nodes: frozenset[str] = frozenset()) -> Resolved:
    """An adapter as a llama.cpp engine would serve it: refused when llama.cpp would drop trained
    modules the user did not accept losing, when the export wrote no GGUF file, or when its files
    are on one node while replicas may run on others (each replica starts with every adapter: one
    it cannot have would keep it from starting at all); an accepted expert adapter is served
    without its experts, beside the others."""
    if r.blocked is not None:
        return r
    files = r.files
    if files is not None and files.kind == "node" and files.node and ready_nodes - {files.node}:
        others = ", ".join(sorted(ready_nodes - {files.node}))
        message = (
            f"{r.source}: llama.cpp replicas start with every adapter, and its files are only on node {files.node} "
            f"while replicas may run on {others}: publish it to a shared volume (the FineTuneJob's "
            "spec.output.publish, named in this LoraServer's spec.adapterStore)"
        )
        return dataclasses.replace(r, blocked=("Unavailable", message))
    if r.spec.fine_tune_job is None:
        # Path and hub adapters carry their own adapter.gguf (the agent checks it is there).
        return r
    if r.dropped and not r.spec.accept_dropped_modules:
        named = "; ".join(f"{m} ({llamacpp.why(m)})" for m in r.dropped)
        message = (
            f"a llama.cpp engine would not apply these trained modules of {r.source}: {named}. Set "
            "acceptDroppedModules: true on this adapter to serve it without them, or serve it with engine.type sglang"
        )
        return dataclasses.replace(r, blocked=("Failed", message))
    if r.gguf_sha256 is None:
        why = r.gguf_error or "the export predates GGUF conversion"
        message = f"{r.source} has no adapter.gguf for llama.cpp ({why}); train it again to export one"
        return dataclasses.replace(r, blocked=("Unavailable", message))
    return dataclasses.replace(r, expert=False)


def _one_name_per_file(judged: list[Resolved]) -> list[Resolved]:
    """The router knows a llama.cpp adapter by its file's digest: two names for the same files
    could not be told apart (and llama-server would load them twice). The first keeps them."""
    first: dict[str, str] = {}
    out = []
    for r in judged:
        owner = first.setdefault(r.sha256, r.spec.name) if r.blocked is None and r.sha256 else r.spec.name
        if owner != r.spec.name:
            message = (
                f"its files (sha256 {r.sha256}) are adapter {owner}'s: a llama.cpp server tells adapters "
                "apart by their files only; serve them under one name"
            )
            out.append(dataclasses.replace(r, blocked=("Failed", message)))
        else:
            out.append(r)
    return out


def _planned(r: Resolved) -> PlannedAdapter:
    assert r.files is not None
    return PlannedAdapter(
        name=r.spec.name, sha256=r.sha256, files=r.files, pinned=r.spec.pinned, gguf_sha256=r.gguf_sha256
    )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which StatefulSets exist, which replicas they hold, and the plan the agents follow."""

    sets: dict[str, tuple[int, sglang.StartAdapter | None]]
    desired: list[str]
    plan: ServingPlan
    wanted: list[Wanted]
    # llama.cpp: the digests of the adapters every replica starts with, in the order of their ids.
    llamacpp_adapters: list[str] | None = None


def llamacpp_layout(
    name: str,
    generation: int,
    spec: LoraServerSpec,
    resolved: list[Resolved],
    ready_nodes: frozenset[str] = frozenset(),
) -> Layout:
    """One set of llama-server replicas, each started with every adapter it can serve (llama.cpp has
    no adapter slots to share out, and loads adapters only at start)."""
    shared_set = render.shared_set_name(name)
    replicas = render.replica_names(shared_set, spec.replicas)
    judged = _one_name_per_file([for_llamacpp(r, ready_nodes) for r in resolved])
    served = [r for r in judged if r.blocked is None and r.sha256]
    plans = [ReplicaPlan(replica=n, adapters=[_planned(r) for r in served]) for n in replicas]
    wanted: list[Wanted] = []
    for r in judged:
        dropped = (r.dropped or ()) if r.spec.accept_dropped_modules else ()
        if r.blocked is not None:
            wanted.append(Wanted(r.spec.name, "Shared", sha256=r.sha256, source=r.source, blocked=r.blocked))
        else:
            wanted.append(
                Wanted(r.spec.name, "Shared", tuple(replicas), r.sha256, r.source, dropped=dropped, at_start=True)
            )
    plan = ServingPlan(
        served_model_name=spec.served_model_name, generation=generation, replicas=plans, engine="llamacpp"
    )
    digests = [str(r.sha256) for r in served]
    return Layout({shared_set: (spec.replicas, None)}, replicas, plan, wanted, llamacpp_adapters=digests)


def layout(name: str, generation: int, spec: LoraServerSpec, resolved: list[Resolved], cache: str) -> Layout:
    shared_set = render.shared_set_name(name)
    shared_replicas = render.replica_names(shared_set, spec.replicas)
    sets: dict[str, tuple[int, sglang.StartAdapter | None]] = {shared_set: (spec.replicas, None)}
    plans = {r: ReplicaPlan(replica=r) for r in shared_replicas}
    shareable = [r for r in resolved if r.blocked is None and not r.expert]
    capacity = spec.engine.max_loaded_loras or spec.engine.max_loras_per_batch
    placed = placement.place(
        [placement.Shared(r.spec.name, r.spec.pinned) for r in shareable],
        shared_replicas,
        capacity=capacity,
        per_adapter=spec.placement.replicas_per_adapter,
    )
    for r in shareable:
        for replica in placed[r.spec.name]:
            plans[replica] = ReplicaPlan(replica=replica, adapters=[*plans[replica].adapters, _planned(r)])
    wanted: list[Wanted] = []
    for r in resolved:
        if r.blocked is not None:
            kind = "Unknown" if r.expert is None else ("Expert" if r.expert else "Shared")
            wanted.append(Wanted(r.spec.name, kind, sha256=r.sha256, source=r.source, blocked=r.blocked))
            continue
        if r.expert:
            set_name = render.expert_set_name(name, r.spec.name)
            count = r.spec.dedicated_replicas or 1
            # The engine starts with the adapter from the node cache, where the agent put it.
            start = sglang.StartAdapter(r.spec.name, f"{cache}/{r.sha256 or 'unverified-' + r.spec.name}", r.rank)
            sets[set_name] = (count, start)
            names = render.replica_names(set_name, count)
            for replica in names:
                plans[replica] = ReplicaPlan(replica=replica, expert=True, adapters=[_planned(r)])
            wanted.append(Wanted(r.spec.name, "Expert", tuple(names), r.sha256, r.source))
        else:
            wanted.append(Wanted(r.spec.name, "Shared", tuple(placed[r.spec.name]), r.sha256, r.source))
    desired = [n for s, (count, _) in sets.items() for n in render.replica_names(s, count)]
    plan = ServingPlan(served_model_name=spec.served_model_name, generation=generation, replicas=list(plans.values()))
    return Layout(sets, desired, plan, wanted)


def _component(pod: Mapping[str, Any]) -> str | None:
    return (pod["metadata"].get("labels") or {}).get(COMPONENT)


def reconcile(
    kube: Kube, settings: Settings, body: Mapping[str, Any], spec: LoraServerSpec
) -> tuple[Verdict, dict[str, Any]]:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status = body.get("status") or {}
    model = model_or_wait(kube, namespace, spec.model.name)
    if isinstance(model, Verdict):
        return model, {}
    llama = spec.engine.type == "llamacpp"
    needed = "gguf" if llama else sglang.variant(spec.engine.kt_method)
    if needed not in (model.get("spec") or {}).get("variants", []):
        setting = "engine.type llamacpp" if llama else f"engine.ktMethod {spec.engine.kt_method}"
        message = (
            f"{setting} serves from the {needed} variant, which KimiModel "
            f"{spec.model.name} does not prepare: add {needed} to its spec.variants"
        )
        return Verdict(state="stalled", reason=LsReason.VARIANT_MISSING, message=message), {}
    gguf_entry = (model.get("status") or {}).get("ggufEntry")
    if llama and not gguf_entry:
        message = f"waiting for KimiModel {spec.model.name} to report its GGUF file (status.ggufEntry)"
        return Verdict(state="progressing", reason=LsReason.MODEL_NOT_READY, message=message), {}
    owner = render.owner(namespace, name, meta["uid"])
    store = spec.adapter_store.persistent_volume_claim.name if spec.adapter_store else None
    ftjs = (
        {
            f["metadata"]["name"]: f
            for f in kube.list_objects(FINE_TUNE_JOB.api_version, FINE_TUNE_JOB.kind, namespace, "")
        }
        if any(a.fine_tune_job is not None for a in spec.adapters)
        else {}
    )
    resolved = [resolve(ftjs, model, a, store) for a in spec.adapters]
    generation = int(meta.get("generation") or 0)
    ready_nodes = frozenset(
        str(n.get("name")) for n in (model.get("status") or {}).get("nodes") or [] if n.get("phase") == "Ready"
    )
    plan_layout = (
        llamacpp_layout(name, generation, spec, resolved, ready_nodes)
        if llama
        else layout(name, generation, spec, resolved, render.CACHE_MOUNT)
    )
    source = (model["spec"].get("source") or {}).get("path")
    facts = render.ModelFacts(
        name=spec.model.name,
        storage_path=model["spec"]["storage"]["hostPath"],
        source_path=(source or {}).get("path"),
        gguf_quantization=((model["spec"].get("gguf") or {}).get("quantization")),
        gguf_entry=gguf_entry,
    )
    for obj in render.rbac(owner):
        kube.apply(obj)
    kube.apply(render.plan_config_map(owner, plan_layout.plan))
    kube.apply(render.service(owner))
    for set_name, (count, start) in plan_layout.sets.items():
        if plan_layout.llamacpp_adapters is not None:
            engines = render.llamacpp_set(
                owner,
                spec,
                facts,
                name=set_name,
                replicas=count,
                image=settings.llamacpp_image,
                adapters=plan_layout.llamacpp_adapters,
            )
        else:
            engines = render.engine_set(
                owner, spec, facts, name=set_name, replicas=count, image=settings.engine_image, expert=start
            )
        kube.apply(engines)
    for obj in router_render.rbac(owner):
        kube.apply(obj)
    kube.apply(router_render.service(owner))
    kube.apply(router_render.deployment(owner, spec, image=settings.router_image))
    for live in kube.list_objects("apps/v1", "StatefulSet", namespace, render.engine_selector(name)):
        if live["metadata"]["name"] not in plan_layout.sets and not live["metadata"].get("deletionTimestamp"):
            # An expert adapter left the spec: its replicas go (shared ones are unloaded in place).
            kube.delete(live)
    # Engine and router pods, listed once: both carry this LoraServer's labels, told apart by component.
    owned = kube.list_objects("v1", "Pod", namespace, selector(common(LORA_SERVER.kind, name)))
    pods = {p["metadata"]["name"]: p for p in owned if _component(p) == render.ENGINE}
    replicas = {
        n: Replica(
            n,
            pods_.ready(p),
            (p.get("spec") or {}).get("nodeName"),
            p["metadata"].get("uid"),
            pods_.unscheduled(p),
            pods_.crashed(p, render.ENGINE),
        )
        for n, p in pods.items()
    }
    reports = {e["name"]: e for e in status.get("engines") or [] if e.get("name")}
    model_status = model.get("status") or {}
    stalled = next(
        (c for c in model_status.get("conditions") or [] if c.get("type") == "Stalled" and c.get("status") == "True"),
        None,
    )
    state = ModelState(
        name=spec.model.name,
        ready_nodes=sum(n.get("phase") == "Ready" for n in model_status.get("nodes") or []),
        stalled=f"{stalled.get('reason')}: {stalled.get('message')}" if stalled else None,
    )
    router = RouterState(
        desired=spec.router.replicas,
        ready=sum(1 for p in owned if _component(p) == router_render.ROUTER and pods_.ready(p)),
        endpoint=router_render.endpoint(namespace, name),
    )
    observed = observe(
        wanted=plan_layout.wanted,
        desired_replicas=plan_layout.desired,
        replicas=replicas,
        reports=reports,
        model=state,
        router=router,
    )
    return observed.verdict, observed.status


def _digests(obj: Mapping[str, Any]) -> set[str]:
    """Every adapter file digest a LoraServer asks for or its engines loaded."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    found = {a.get("sha256") for a in spec.get("adapters") or []}
    found |= {a.get("sha256") for a in status.get("adapters") or []}
    for engine in status.get("engines") or []:
        found |= set((engine.get("loadedSha256") or {}).values())
    return {d for d in found if isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)}


def reclaimable(
    body: Mapping[str, Any], others: Sequence[Mapping[str, Any]], exports: Mapping[str, set[str]] | None = None
) -> list[str]:
    """The cache entries of this LoraServer that no other LoraServer serves: the node cache is shared
    by every LoraServer on the node, keyed by digest only. ``exports``: by LoraServer uid, the
    digests of the FineTuneJob exports it names."""
    uid = body["metadata"].get("uid")
    theirs: set[str] = set()
    for other in others:
        other_uid = other["metadata"].get("uid")
        if other_uid != uid:
            theirs |= _digests(other) | (exports or {}).get(str(other_uid), set())
    return sorted(_digests(body) - theirs)


def finalize(kube: Kube, settings: Settings, body: Mapping[str, Any], spec: LoraServerSpec | None) -> list[str]:
    """Engine and router pods go with the LoraServer (owner references), and their engines' adapters
    with them. The node copies of its adapters are kept unless adapterCache.reclaimPolicy is Delete;
    then the engines go first (their agents would copy the files back), and a Job on each node of the
    model removes the copies no other LoraServer uses. Returns what is still awaited."""
    if spec is None or spec.adapter_cache.reclaim_policy != "Delete":
        return []
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    model = kube.get(KIMI_MODEL.api_version, KIMI_MODEL.kind, namespace, spec.model.name)
    if model is None:
        # The storage path is declared only in the KimiModel; without it there is nothing to mount.
        return []
    # The agents copy back whatever their plan names while they run: the engine pods go first
    # (the garbage collector would delete them only after this finalizer is done).
    engine_selector = render.engine_selector(name)
    for live in kube.list_objects("apps/v1", "StatefulSet", namespace, engine_selector):
        if not live["metadata"].get("deletionTimestamp"):
            kube.delete(live)
    engines = kube.list_objects("v1", "Pod", namespace, engine_selector)
    if engines:
        return [f"{len(engines)} engine pods to end before the adapter cache is cleaned"]
    others = kube.list_objects(LORA_SERVER.api_version, LORA_SERVER.kind, None)
    digests = reclaimable(body, others, _exports_of(kube, others))
    if not digests:
        return []
    owner = render.owner(namespace, name, meta["uid"])
    # The nodes the model is on (a node it never reached holds no cache of it).
    holding = [n.get("name") for n in (model.get("status") or {}).get("nodes") or [] if n.get("phase") == "Ready"]
    storage = model["spec"]["storage"]["hostPath"]
    roots = [f"{MOUNT}/{render.CACHE_DIR}/{d}" for d in digests]
    waiting = []
    for node in holding:
        job = cleanup.cleanup_job(
            owner,
            node=str(node),
            storage_path=storage,
            root=roots,
            image=settings.engine_image,
            pod_metadata=spec.pod_metadata,
        )
        waiting += cleanup_waiting(job, kube.create(job))
    return waiting


def _exports_of(kube: Kube, servers: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """By LoraServer uid: the digests of the FineTuneJob exports it names (an agent may have copied
    one it has not reported yet)."""
    named = [
        (s["metadata"], a["fineTuneJob"]["name"])
        for s in servers
        for a in (s.get("spec") or {}).get("adapters") or []
        if a.get("fineTuneJob")
    ]
    if not named:
        return {}
    exports = {
        (f["metadata"]["namespace"], f["metadata"]["name"]): ((f.get("status") or {}).get("adapter") or {}).get(
            "sha256"
        )
        for f in kube.list_objects(FINE_TUNE_JOB.api_version, FINE_TUNE_JOB.kind, None)
    }
    found: dict[str, set[str]] = {}
    for meta, job in named:
        if sha := exports.get((meta["namespace"], job)):
            found.setdefault(str(meta.get("uid")), set()).add(str(sha))
    return found

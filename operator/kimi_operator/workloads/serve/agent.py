"""``kimi-operator serve-agent``: keep one engine's adapters equal to the serving plan, and report
what the engine itself lists.

Each step: read the plan (the operator's ConfigMap), bring every adapter placed on this replica
into the node cache (checked against its sha256 before the engine sees it), ask the engine for its
``/v1/models``, load and unload until it matches, ask again, and write what it lists into the
LoraServer's ``status.engines[name=<replica>]`` under this agent's own field manager. An engine
that restarted comes back with only its start-up adapters; the next step loads the rest again.

A llama.cpp engine (``--engine-api=llamacpp``, else the plan's ``engine: llamacpp``) has its
adapters fixed at its start, the cache files of its command line: each step only asks it which
files it has (``/lora-adapters``) and reports the planned adapters they are, in the same form;
nothing is loaded or unloaded. The step fetches an adapter whose entry is missing, but never
completes an entry (that is ``--once``'s work): an entry without adapter.gguf is reported, not
fetched again every step. Without a readable plan it keeps reporting against the last one it read.

With ``--once`` (the init container of expert replicas and of llama.cpp engines) it only fills the
cache, checks that each entry holds what the engine will load (for llama.cpp, adapter.gguf with the
digest the export reported), and exits. ``--adapter-digests`` names the entries the pod's own
command line loads: then exactly those are made ready, whatever the plan places on this replica now.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kimi_operator.api.conditions import now_rfc3339
from kimi_operator.api.loraserver import KIND, PLURAL
from kimi_operator.api.serving import (
    AGENT_FIELD_MANAGER_PREFIX,
    GGUF_ADAPTER_FILE,
    PLAN_KEY,
    EngineApi,
    PlannedAdapter,
    ServingPlan,
)
from kimi_operator.workloads.events import emit
from kimi_operator.workloads.serve import cache, llamacpp
from kimi_operator.workloads.serve.engine import Engine, EngineDown, LlamaServer
from kimi_operator.workloads.serve.sync import Load, Unload, Want, actions

log = logging.getLogger(__name__)

PlanSource = Callable[[], ServingPlan | None]
StatusWriter = Callable[[dict[str, Any]], None]

# Files a cache entry must hold besides the weights for each kind of engine to load it, and what is
# reported when one is missing.
NEEDS: dict[EngineApi, dict[str, str]] = {"sglang": {}, "llamacpp": {GGUF_ADAPTER_FILE: llamacpp.NO_GGUF}}


MAX_MESSAGE = 2000
# /freeze_gc's answers: done, and the engine has no such endpoint (an older SGLang).
FROZEN, NO_FREEZE = 200, (404, 405)


def _short(message: str) -> str:
    """Messages go into status, whose fields are bounded: keep the start and the end."""
    return message if len(message) <= MAX_MESSAGE else f"{message[:1400]} ... {message[-500:]}"


class Agent:
    def __init__(
        self,
        *,
        replica: str,
        engine: Engine,
        plan: PlanSource,
        models_dir: Path,
        cache_dir: Path,
        pod_uid: str | None = None,
        store_dir: Path | None = None,
        llama: LlamaServer | None = None,
        engine_api: EngineApi | None = None,
    ) -> None:
        self.store_dir = store_dir
        # The same engine seen as a llama-server, asked when it is one.
        self.llama = llama or LlamaServer(engine.url)
        # The kind of engine beside this agent when its pod says so (--engine-api): kept whatever
        # the plan says, so during a switch of engines an old pod's agent keeps to its own engine.
        self.engine_api = engine_api
        # The kind of engine asked at the last step: without a plan, the step keeps to it.
        self.api: EngineApi = engine_api or "sglang"
        # The last plan read: a llama.cpp step without a readable plan reports against it.
        self.last_plan: ServingPlan | None = None
        # (path, size, mtime, inode) of a file -> its sha256: a large adapter.gguf is hashed once,
        # not at every step.
        self.file_digests: dict[tuple[str, int, int, int], str] = {}
        # Adapters whose cache entry holds another adapter.gguf than the one their export wrote.
        self.wrong_files: set[str] = set()
        # Source (and the adapter.gguf digest expected of it) -> why its files were refused: a source
        # holding another adapter.gguf is not fetched again at every step (--once always fetches).
        self.wrong_sources: dict[str, str] = {}
        # source key -> the digest its files had (adapters declared without a sha256).
        self.digests: dict[str, str] = {}
        # adapter -> whether this agent loaded it pinned.
        self.pinned_as: dict[str, bool] = {}
        self.replica, self.engine, self.plan = replica, engine, plan
        self.models_dir, self.cache_dir, self.pod_uid = models_dir, cache_dir, pod_uid
        # name -> (path, the engine's words): files the engine refused, not sent again until they
        # change or the engine restarts.
        self.refused: dict[str, tuple[str, str]] = {}
        self.unavailable: dict[str, tuple[str | None, str]] = {}
        self.engine_was_up = False
        # Set when the engine took an adapter update and never answered: no other is sent until
        # the engine restarts, each would only wait as long.
        self.stuck: str | None = None
        # The engine's last answer to /freeze_gc since it started: None not asked yet, 0 no answer.
        # Asked until it says 200 (frozen) or that it has no such endpoint.
        self.freeze_answer: int | None = None

    def _fetch(self, adapter: PlannedAdapter) -> Callable[[Path], None]:
        files = adapter.files
        if files.kind == "node":
            return cache.copy_from(cache.within(self.models_dir, files.path or ""), node_hint=files.node)
        if files.kind == "store":
            if self.store_dir is None:
                return cache.unavailable("the plan names the adapter store, but this pod does not mount it")
            return cache.copy_from(cache.within(self.store_dir, files.path or ""), node_hint=None)

        def from_hub(target: Path) -> None:
            # The same client as the prepare and training pods: the revision resolved to a commit,
            # every file checked against the hub's own checksums.
            from kimi_operator.workloads import hub  # noqa: PLC0415 (only hub sources need it)

            # The LoraServer's hub token, given to this container by the kubelet (never read here
            # from a Secret: the agent's Role has no right to Secrets). It goes to the hub the
            # LoraServer names for it, never to another endpoint an adapter names.
            token = os.environ.get("HF_TOKEN") or None
            token_hub = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
            if files.endpoint and files.endpoint.rstrip("/") != token_hub:
                token = None
            repo, revision = files.repo or "", files.revision or "main"
            prefix = f"{files.subfolder.strip('/')}/" if files.subfolder else ""
            sha, listed = hub.resolve(repo, revision, token=token, endpoint=files.endpoint)
            wanted = [f for f in listed if f.path.startswith(prefix) and "/" not in f.path[len(prefix) :]]
            if not wanted:
                raise cache.Unavailable(f"{repo}@{sha} has no files under {prefix or 'its root'}")
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                hub.download(repo, sha, Path(tmp), wanted, token=token, endpoint=files.endpoint, max_workers=2)
                problems = hub.verify(Path(tmp), wanted)
                if problems:
                    raise cache.Unavailable("; ".join(problems))
                for item in wanted:
                    shutil.copyfile(Path(tmp) / item.path, target / item.path[len(prefix) :])

        return from_hub

    def _known(self, adapter: PlannedAdapter) -> str | None:
        """The digest this source gave last time, so an adapter without a declared sha256 is not
        fetched again at every step (a node directory by its weights' size and time, a hub source
        by repository and revision)."""
        if adapter.sha256:
            return adapter.sha256
        key = self._source_key(adapter)
        return self.digests.get(key) if key else None

    def _source_key(self, adapter: PlannedAdapter) -> str | None:
        files = adapter.files
        if files.kind == "hub":
            return f"hub:{files.endpoint}:{files.repo}@{files.revision}/{files.subfolder}"
        root = self.models_dir if files.kind == "node" else self.store_dir
        try:
            weights = cache.within(root or Path("/nonexistent"), files.path or "") / cache.WEIGHTS
            stat = weights.stat()
        except (cache.Unavailable, OSError):
            return None
        return f"{files.kind}:{files.path}:{stat.st_size}:{stat.st_mtime_ns}"

    def api_of(self, plan: ServingPlan | None) -> EngineApi:
        """The kind of engine to talk to: the pod's own (``--engine-api``), else the plan's (None is
        SGLang, left out of the plan for older agents), else the one asked last."""
        if self.engine_api is not None:
            return self.engine_api
        if plan is not None:
            return plan.engine or "sglang"
        return self.api

    def _digest_of(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if key not in self.file_digests:
            self.file_digests[key] = cache.sha256_of(path)
        return self.file_digests[key]

    def _wrong_file(self, entry: Path, checked: dict[str, str]) -> str | None:
        """Why the cache entry's files are not the ones expected (None: they are)."""
        for name, want in checked.items():
            found = self._digest_of(entry / name)
            if found != want:
                return (
                    f"{entry / name} has sha256 {found}, expected {want} (the digest of the {name} the adapter's "
                    f"export wrote): the cache entry holds another {name} for these weights, which no engine is "
                    f"given; remove {entry} on the node of {self.replica} (its adapter cache) so that the next "
                    "start fetches it again"
                )
        return None

    def materialise(
        self, adapters: Sequence[PlannedAdapter], api: EngineApi = "sglang", *, complete: bool = True
    ) -> dict[str, Want]:
        """Cache path of every adapter that could be had as ``api``'s engine loads it; the others are
        remembered as unavailable. ``complete``: an entry without a file the engine needs is fetched
        again to add it (``--once``); otherwise it is only reported."""
        desired: dict[str, Want] = {}
        self.unavailable = {}
        self.wrong_files = set()
        needs = NEEDS[api]
        for adapter in adapters:
            key = self._source_key(adapter)
            # llama.cpp: the adapter.gguf of a FineTuneJob's export must be the one it reported.
            checked = {GGUF_ADAPTER_FILE: adapter.gguf_sha256} if api == "llamacpp" and adapter.gguf_sha256 else {}
            require = tuple(needs) if complete else ()
            wrong_key = f"{key}:{adapter.gguf_sha256}" if key and checked else None
            if not complete and wrong_key in self.wrong_sources:
                self.unavailable[adapter.name] = (adapter.sha256, self.wrong_sources[wrong_key])
                continue
            try:
                path = cache.materialise(self.cache_dir, self._known(adapter), self._fetch(adapter), require, checked)
            except cache.WrongFile as exc:
                self.unavailable[adapter.name] = (adapter.sha256, _short(str(exc)))
                if wrong_key:
                    self.wrong_sources[wrong_key] = self.unavailable[adapter.name][1]
                continue
            except (cache.Unavailable, OSError) as exc:
                self.unavailable[adapter.name] = (adapter.sha256, _short(str(exc)))
                continue
            except Exception as exc:  # a hub error of any kind is this adapter's, not the agent's
                self.unavailable[adapter.name] = (adapter.sha256, _short(f"download failed: {exc}"))
                continue
            if key and not adapter.sha256:
                self.digests[key] = path.name
            missing = [why for name, why in needs.items() if not (path / name).is_file()]
            if missing:
                self.unavailable[adapter.name] = (path.name, missing[0])
                continue
            try:
                wrong = self._wrong_file(path, checked)
            except OSError as exc:
                wrong = _short(f"reading {path}: {exc}")
            if wrong is not None:
                self.unavailable[adapter.name] = (path.name, wrong)
                self.wrong_files.add(adapter.name)
                continue
            desired[adapter.name] = Want(str(path), adapter.pinned)
        return desired

    def step(self) -> dict[str, Any]:
        """One comparison of the engine with the plan; returns this replica's report."""
        plan = self.plan()
        self.api = self.api_of(plan)
        if plan is not None:
            self.last_plan = plan
        if self.api == "llamacpp":
            # No plan readable (the ConfigMap being recreated): the server has not changed, so it is
            # reported against the last plan read rather than as listing nothing.
            return self._step_fixed(self.last_plan)
        return self._step_sglang(plan)

    def _step_fixed(self, plan: ServingPlan | None) -> dict[str, Any]:
        """A llama-server's step: its adapters were fixed at its start, so it is only asked which
        files it has. An adapter planned here that it does not have (its pod is being replaced with
        a new list) is not listed, and nothing is sent: only a restart with the new list loads it."""
        mine = plan.for_replica(self.replica) if plan else None
        planned = mine.adapters if mine else []
        # Still fetched when not cached: the digests of adapters planned without one name their
        # files, an adapter its source lost is reported, and the pod replacing this one finds the
        # cache filled. An entry lacking adapter.gguf is only reported: completing it (a copy or a
        # download, and a digest, at every step) is --once's work.
        self.materialise(planned, "llamacpp", complete=False)
        try:
            files = self.llama.adapter_files()
        except EngineDown as exc:
            log.info("engine not answering: %s", exc)
            return self.report(up=False, listed={}, planned=planned)
        digests = {a.name: sha for a in planned if (sha := self._known(a))}
        listed = llamacpp.adapters_of_files(files, digests, self.cache_dir)
        # The server keeps the files it loaded at start, whatever their source says now; but a file
        # other than the one the export wrote is not the adapter asked for.
        for name in [n for n in self.unavailable if n in listed]:
            if name in self.wrong_files:
                listed.pop(name)
                continue
            log.warning("%s is served from %s: %s", name, listed[name], self.unavailable.pop(name)[1])
        return self.report(up=True, listed=listed, planned=planned)

    def _step_sglang(self, plan: ServingPlan | None) -> dict[str, Any]:
        mine = plan.for_replica(self.replica) if plan else None
        planned = mine.adapters if mine else []
        desired = self.materialise(planned)
        served = plan.served_model_name if plan else ""
        try:
            listed = self.engine.models(served)
        except EngineDown as exc:
            log.info("engine not answering: %s", exc)
            self.engine_was_up = False
            self.stuck = None  # a restart is what unsticks it; a down engine is reported as down
            return self.report(up=False, listed={}, planned=planned)
        if not self.engine_was_up:
            self.refused.clear()  # a (re)started engine gets another chance at everything
            self.stuck = None
            if self.freeze_answer not in NO_FREEZE:
                self.freeze_answer = None  # a new process: its heap is frozen again
        self.engine_was_up = True
        # An adapter the engine serves whose source failed this time (a hub hiccup) stays loaded
        # from the files the engine has; the failure is logged, not turned into an unload.
        for name in [n for n in self.unavailable if n in listed and n not in desired]:
            log.warning("keeping %s loaded from %s: %s", name, listed[name], self.unavailable.pop(name)[1])
            pinned = next((a.pinned for a in planned if a.name == name), False)
            desired[name] = Want(listed[name], pinned)
        # No plan for this replica (the ConfigMap is being recreated, or the replica was just
        # added): change nothing rather than unload everything. Expert replicas load at start only.
        if mine is not None and not mine.expert and self.stuck is None:
            refused = {(n, p) for n, (p, _) in self.refused.items()}
            changes = actions(desired, listed, refused, self.pinned_as)
            for action in changes:
                if not self._apply(action):
                    break
            if changes:
                try:
                    listed = self.engine.models(served)
                except EngineDown:
                    self.engine_was_up = False
                    return self.report(up=False, listed={}, planned=planned)
        # Refusals of files no longer wanted are forgotten.
        self.refused = {n: r for n, r in self.refused.items() if n in desired and desired[n].path == r[0]}
        self._freeze_if_due()
        return self.report(up=True, listed=listed, planned=planned)

    def _freeze_if_due(self) -> None:
        """Freeze the engine's heap once per engine start, after its warm-up (``/health`` 200) and
        the step's loads, as SGLang advises against the pauses of its garbage collector: what is
        alive then (imports, the weights' bookkeeping, the start-up adapters) lives as long as the
        engine, and each full collection would walk it again. Once only: gc.freeze() keeps whatever
        garbage exists at that moment for good, so freezing at every later load could leak."""
        if self.freeze_answer == FROZEN or self.freeze_answer in NO_FREEZE or not self.engine.healthy():
            return
        status = self.engine.freeze_gc() or 0
        if status == FROZEN:
            log.info("engine heap frozen (/freeze_gc)")
        elif status in NO_FREEZE:
            log.warning("the engine has no /freeze_gc: its garbage collector may pause it under load")
        elif status != self.freeze_answer:
            # Tried again at the next step; said once per kind of answer.
            log.warning("/freeze_gc answered %s; trying again", status or "nothing")
        self.freeze_answer = status

    def _apply(self, action: Load | Unload) -> bool:
        """Send one change; False when it got no answer in time: the next ones would wait behind it."""
        if isinstance(action, Unload):
            answer = self.engine.unload(action.name)
            log.info("unload %s: %s", action.name, answer)
        else:
            answer = self.engine.load(action.name, action.path, pinned=action.pinned)
            log.info("load %s from %s: %s", action.name, action.path, answer)
        if answer.stuck:
            what = "unload of" if isinstance(action, Unload) else "load of"
            self.stuck = _short(
                f"the engine's adapter updates are stuck: the {what} {action.name} {answer.message} (SGLang "
                "never releases an adapter whose non-streamed request was aborted, and every later load and "
                "unload waits behind its unload); restart this replica's pod"
            )
            log.error("%s", self.stuck)
        if answer.timed_out:
            return False
        if isinstance(action, Unload):
            return True
        if answer.ok:
            self.pinned_as[action.name] = action.pinned
        # A name the engine already holds (it reloaded it for a request between our unload and
        # load) is not a verdict on the files: the next step unloads and loads again.
        if answer.refused and "already" not in answer.message.lower():
            self.refused[action.name] = (action.path, _short(answer.message))
        return True

    def report(self, *, up: bool, listed: dict[str, str], planned: Sequence[PlannedAdapter]) -> dict[str, Any]:
        names = {a.name for a in planned}
        loaded = {n: Path(p).name for n, p in listed.items() if Path(p).parent == self.cache_dir}
        errors: dict[str, dict[str, Any]] = {}
        for name, (path, message) in sorted(self.refused.items()):
            if name in names:
                errors[name] = {"name": name, "reason": "Refused", "sha256": Path(path).name, "message": message}
        for name, (sha, message) in sorted(self.unavailable.items()):
            errors[name] = {
                "name": name,
                "reason": "Unavailable",
                "message": message,
                **({"sha256": sha} if sha else {}),
            }
        if self.stuck is not None:
            # Every adapter planned here and not listed as asked (absent, or from other files) waits
            # on the stuck engine, whatever else.
            for adapter in planned:
                as_asked = adapter.name in listed and adapter.sha256 in (None, loaded.get(adapter.name))
                if not as_asked and adapter.name not in errors:
                    errors[adapter.name] = {"name": adapter.name, "reason": "EngineStuck", "message": self.stuck}
        report: dict[str, Any] = {
            "name": self.replica,
            "engineUp": up,
            "adapters": sorted(listed),
            "loadedSha256": loaded,
            "errors": [errors[n] for n in sorted(errors)],
        }
        if self.pod_uid:
            report["podUid"] = self.pod_uid
        return report


def _kube_sources(namespace: str, plan_name: str) -> tuple[Any, PlanSource]:
    import kubernetes  # noqa: PLC0415 (only the pod's entry needs the client)

    from kimi_operator.kubeconfig import load_client  # noqa: PLC0415

    api = load_client()
    core = kubernetes.client.CoreV1Api(api)

    def plan() -> ServingPlan | None:
        try:
            found = core.read_namespaced_config_map(plan_name, namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return ServingPlan.model_validate(json.loads((found.data or {})[PLAN_KEY]))

    return api, plan


def _unplanned_name(digest: str) -> str:
    """The name an error about a digest no planned adapter has is reported under."""
    return f"unplanned-{digest[:12]}"


def _by_digest(agent: Agent, plan: ServingPlan | None, digests: Sequence[str]) -> list[PlannedAdapter]:
    """The plan's adapter of each digest (this replica's first, else any replica's), each once; a
    digest without one is reported unavailable."""
    mine = plan.for_replica(agent.replica) if plan else None
    known: dict[str, PlannedAdapter] = {}
    everywhere = [*(mine.adapters if mine else []), *(a for r in (plan.replicas if plan else []) for a in r.adapters)]
    for adapter in everywhere:
        if adapter.sha256:
            known.setdefault(adapter.sha256, adapter)
    found: list[PlannedAdapter] = []
    for digest in dict.fromkeys(digests):
        if digest in known:
            found.append(known[digest])
    return found


def fill_once(agent: Agent, plan: ServingPlan | None, write: StatusWriter, digests: Sequence[str] | None = None) -> int:
    """``--once``, before the engine starts: every adapter planned for this replica into the node
    cache, as its engine loads it, each entry completed and checked. 0 when all are there;
    otherwise 1, with the missing ones reported Unavailable (the pod's init container fails, and
    status says why).

    ``digests`` (``--adapter-digests``): the cache entries the pod's own command line loads. Then
    exactly the plan's adapters of those weights are made ready, whatever the plan places on this
    replica now (the plan and the pod's template can disagree while a change rolls out); a digest
    no planned adapter has fails it too, named."""
    api = agent.api_of(plan)
    mine = plan.for_replica(agent.replica) if plan else None
    planned = mine.adapters if mine else []
    if digests is not None:
        planned = _by_digest(agent, plan, digests)
    agent.materialise(planned, api)
    if digests is not None:
        have = {a.sha256 for a in planned}
        for digest in dict.fromkeys(d for d in digests if d not in have):
            agent.unavailable[_unplanned_name(digest)] = (
                digest,
                f"this pod's command line names the adapter files of sha256 {digest} ({agent.cache_dir / digest}), "
                "but the serving plan has no adapter of these weights: the LoraServer's adapters changed since "
                "this pod was made, and the pod replacing it does not load them",
            )
    if not agent.unavailable:
        return 0
    report = agent.report(up=False, listed={}, planned=planned)
    write({"engines": [{**report, "lastSyncTime": now_rfc3339()}]})
    emit({"event": "unavailable", "adapters": agent.unavailable}, sys.stderr)
    return 1


def parse_digests(value: str) -> list[str]:
    """``--adapter-digests``: comma-separated, in the engine's order; empty: none."""
    return [d.strip() for d in value.split(",") if d.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-operator serve-agent", description=__doc__)
    parser.add_argument("--report", required=True, help="namespace/name of the LoraServer")
    parser.add_argument("--plan", required=True, help="ConfigMap holding the serving plan")
    parser.add_argument("--replica", required=True, help="this engine pod's name")
    parser.add_argument("--engine", required=True, help="URL of the engine beside this agent")
    parser.add_argument("--models-dir", type=Path, required=True, help="the model storage as mounted here")
    parser.add_argument("--cache-dir", type=Path, required=True, help="the node's adapter cache as mounted here")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between comparisons")
    parser.add_argument("--once", action="store_true", help="fill the cache for this replica and exit")
    parser.add_argument("--pod-uid", default="", help="this pod's UID, so reports of an earlier pod are told apart")
    parser.add_argument("--store-dir", type=Path, help="the shared adapter store as mounted here")
    parser.add_argument(
        "--engine-api",
        choices=("sglang", "llamacpp"),
        help="the kind of engine beside this agent, whatever the plan says (default: the plan's)",
    )
    parser.add_argument(
        "--adapter-digests",
        help=(
            "with --once: the weights digests (cache entries) the engine's command line loads, comma-separated "
            "('' = none); exactly these are made ready (default: the plan's adapters for this replica)"
        ),
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    namespace, name = args.report.split("/", 1)
    api, plan = _kube_sources(namespace, args.plan)
    from kimi_operator.workloads.report import OwnStatus  # noqa: PLC0415

    own = OwnStatus(
        api, kind=KIND, plural=PLURAL, namespace=namespace, name=name, manager=AGENT_FIELD_MANAGER_PREFIX + args.replica
    )
    agent = Agent(
        replica=args.replica,
        engine=Engine(args.engine),
        plan=plan,
        models_dir=args.models_dir,
        cache_dir=args.cache_dir,
        pod_uid=args.pod_uid or None,
        store_dir=args.store_dir,
        engine_api=args.engine_api,
    )
    if args.once:
        digests = None if args.adapter_digests is None else parse_digests(args.adapter_digests)
        return fill_once(agent, plan(), own.apply, digests)
    # Before anything slow (a download): whatever an earlier pod of this name reported is void now.
    first = agent.report(up=False, listed={}, planned=[])
    own.apply({"engines": [{**first, "lastSyncTime": now_rfc3339()}]})
    last = first
    while True:
        try:
            report = agent.step()
            # Written only when it changed: an idle replica costs the apiserver nothing.
            if report != last:
                own.apply({"engines": [{**report, "lastSyncTime": now_rfc3339()}]})
                last = report
        except Exception:  # the apiserver or the plan failing now may not fail next time
            log.exception("step failed; trying again")
        time.sleep(args.interval)

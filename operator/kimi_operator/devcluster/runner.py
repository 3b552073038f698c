"""The local pod runner: a kubelet's part for pods on the simulated (KWOK) nodes that opt in.

KWOK only moves pods between phases; for a pod annotated ``sim.kimi-operator.io/run: "true"``
(a Job's pod also ``sim.kimi-operator.io/hold: "true"``, so that KWOK keeps it Running meanwhile)
this runner runs the pod's real programs as processes of this machine, as ``podplan`` says: init
containers in order (sidecars, restartable init containers, beside the rest), then the containers,
each with its log in
``<cluster>/logs/<namespace>.<pod>.<container>.log``. When the containers have exited, and then its
sidecars, it writes the outcome where KWOK's stages (``e2e/cluster/kwok-stages.yaml``) turn it into
the pod's status (``podprotocol``):

- all exited 0: the hold annotation is removed; KWOK marks the pod Succeeded (exit code 0);
- otherwise: the ``sim.kimi-operator.io/fail`` label with the first failing container's exit code,
  reason and termination message as annotations; KWOK marks the pod Failed with them.

Pods with restartPolicy Always or OnFailure get their containers restarted, and sidecars always
are, with the kubelet's back-off: 10 s, doubling to 300 s, forgotten once a container has run for
10 minutes. A deleted pod's processes get SIGTERM, then SIGKILL after its grace period. The files
of Secret and ConfigMap volumes are written again when their source changes (checked every 5 s).

    python -m kimi_operator.devcluster.runner --dir .cluster [--images images.yaml]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
import yaml

from kimi_operator.devcluster import podplan, podprotocol
from kimi_operator.devcluster.nodes import KWOK_NODE_ANNOTATION
from kimi_operator.devcluster.podenv import MissingReference, PlanError, References
from kimi_operator.devcluster.podplan import ContainerPlan, Image, Plan, RunnerConfig
from kimi_operator.devcluster.podprocess import START_ERROR_CODE, Process, stop_leftovers
from kimi_operator.devcluster.podprotocol import Result

log = logging.getLogger(__name__)

# Variables of this machine every process needs to work at all; nothing else is inherited.
BASE_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TZ", "XDG_CACHE_HOME")
TOKEN_SECONDS = 3607  # what the ServiceAccount admission plugin asks for (the apiserver extends it)
POLL = 0.1
BACKOFF = (10.0, 300.0)  # the kubelet's: a restart's first delay, doubling up to the second
WATCH_SECONDS = 5
REFRESH = 5.0  # seconds between reads of the Secrets and ConfigMaps a running pod's volumes show


# LLaMA-Factory's arguments that make a training pod's run fit this machine (no GPU, no kt-kernel),
# and a report every second: a run of the tiny model lasts seconds, not the hours the pod's 5 s
# default is made for, and `kubectl get ftj -w` should show it moving. (trust_remote_code stays as
# rendered: Kimi K2.5's modelling code, the tiny model's own here, ships beside its weights.)
CPU_TRAINING = (
    "--set=use_cpu=true",
    "--set=bf16=false",
    "--set=use_kt=false",
    "--set=preprocessing_num_workers=1",
    "--report-interval=1",
)


def base_env() -> dict[str, str]:
    return {k: os.environ[k] for k in BASE_ENV if k in os.environ}


def kubeconfig_image(python: str, operator_dir: Path) -> Image:
    """An image whose ENTRYPOINT is ``kimi-operator`` (the operator's package on ``python``)."""
    return Image(
        programs={("kimi-operator",): (python, "-m", "kimi_operator")},
        entrypoint=("kimi-operator",),
        env={"PYTHONPATH": str(operator_dir)},
    )


def default_images(repo: Path, *, train_python: str | None, llamacpp: Path | None) -> dict[str, Image]:
    """The project's images (images/*/Dockerfile) mapped to this machine: the operator's own python
    for prepare and router, the training environment for the trainer and the SGLang stand-in, the
    built llama-server for llama.cpp engines."""
    operator_dir = repo / "operator"
    this = kubeconfig_image(sys.executable, operator_dir)
    trainer = kubeconfig_image(train_python or sys.executable, operator_dir)
    # The simulated nodes' GPUs are not on this machine: the training pods train on its CPU, in
    # float32, without kt-kernel (the image's LLaMA-Factory arguments, overridden the way a user
    # overrides one). Their exported adapter is converted with this machine's llama.cpp.
    trainer_programs = dict(trainer.programs)
    trainer_programs["kimi-operator", "train"] = (*trainer.programs["kimi-operator",], "train", *CPU_TRAINING)
    # Not offline: a FineTuneJob's hub dataset comes from a hub on 127.0.0.1.
    trainer_env = {**trainer.env, "TOKENIZERS_PARALLELISM": "false"}
    if llamacpp:
        trainer_env["KIMI_LLAMACPP_SRC"] = str(llamacpp / "src")
    trainer = Image(programs=trainer_programs, entrypoint=trainer.entrypoint, env=trainer_env)
    engine_programs: dict[tuple[str, ...], tuple[str, ...]] = dict(this.programs)
    if train_python:
        standin = (train_python, str(repo / "e2e" / "engines" / "sglang_standin.py"))
        engine_programs["python", "-m", "sglang.launch_server"] = standin
    engine_env = {**this.env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    engine = Image(programs=engine_programs, entrypoint=(), env=engine_env)
    llama_programs = dict(this.programs)
    if llamacpp:
        llama_programs["llama-server",] = (str(llamacpp / "bin" / "llama-server"),)
    return {
        "ghcr.io/kimi-operator/prepare": this,
        "ghcr.io/kimi-operator/router": this,
        "ghcr.io/kimi-operator/operator": this,
        "ghcr.io/kimi-operator/trainer": trainer,
        "ghcr.io/kimi-operator/engine": engine,
        "ghcr.io/kimi-operator/llamacpp": Image(programs=llama_programs, env=this.env),
    }


def images_from_env(repo: Path) -> dict[str, Image]:
    """The project's images with the environments the Makefile names: KIMI_TRAIN_PYTHON (the
    trainer and the SGLang stand-in) and KIMI_LLAMACPP (llama-server, the GGUF converter)."""
    llamacpp = os.environ.get("KIMI_LLAMACPP")
    return default_images(
        repo, train_python=os.environ.get("KIMI_TRAIN_PYTHON"), llamacpp=Path(llamacpp) if llamacpp else None
    )


def images_from_file(path: Path) -> dict[str, Image]:
    """Images from YAML: ``{repo: {programs: [{image: [argv...], local: [argv...]}], entrypoint: [...],
    cmd: [...], env: {...}}}``."""
    doc = yaml.safe_load(path.read_text()) or {}
    return {
        repo: Image(
            programs={tuple(p["image"]): tuple(p["local"]) for p in spec.get("programs") or []},
            entrypoint=tuple(spec.get("entrypoint") or ()),
            cmd=tuple(spec.get("cmd") or ()),
            env={k: str(v) for k, v in (spec.get("env") or {}).items()},
        )
        for repo, spec in doc.items()
    }


# -- one pod ---------------------------------------------------------------------------------------


class Stopped(Exception):
    """The pod was deleted (or the runner stopped) while it ran."""


# What may pass if asked again: the apiserver's errors other than 404 (those are absences), and
# connections that broke or timed out.
TRANSIENT = (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError)


@dataclasses.dataclass(eq=False)
class _Container:
    """A started container and its restarts."""

    process: Process
    backoff: float
    due: float | None = None  # when it starts again
    result: Result | None = None  # once it is done (exited, not to be restarted)


class PodWorker(threading.Thread):
    """Runs one pod from start to outcome."""

    def __init__(self, runner: PodRunner, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}.{meta['name']}", daemon=True)
        self.runner, self.pod = runner, pod
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.pod_dir = runner.config.pod_dir(meta["uid"])
        self.default_grace = float(podprotocol.spec_grace_seconds(pod))
        self.stopping = threading.Event()
        self.kill_at = math.inf  # time.monotonic() of the SIGKILL, once stopping
        self.running: list[Process] = []  # every process started, until all are stopped
        self.sidecars: list[_Container] = []
        self.plan: Plan | None = None
        self.refs: References | None = None
        self.refreshed_at = 0.0
        self._lock = threading.Lock()
        self._finished = False
        self._gone = False

    def stop(self, grace: float | None = None) -> None:
        """Stop the pod's processes: SIGKILL ``grace`` seconds from now, or earlier if an earlier
        stop said so (the grace is an upper bound). Without ``grace`` a stop already in progress
        keeps its deadline, else the pod's terminationGracePeriodSeconds applies (KWOK deletes a
        terminating pod at once, with grace 0: that last event must not cut the grace short)."""
        with self._lock:
            if grace is not None or not self.stopping.is_set():
                chosen = self.default_grace if grace is None else grace
                self.kill_at = min(self.kill_at, time.monotonic() + chosen)
            self.stopping.set()
            kill_at, running = self.kill_at, list(self.running)
        for process in running:
            process.hurry(kill_at)

    def process(self, container: str) -> Process | None:
        """The process of a container of this pod (the latest start), None before it started."""
        with self._lock:
            found = [p for p in self.running if p.container.name == container]
        return found[-1] if found else None

    def restarts(self) -> dict[str, int]:
        """By container: how many times it was started again (a pod status's restartCount)."""
        with self._lock:
            return {p.container.name: p.starts - 1 for p in self.running}

    def forget(self) -> None:
        """The pod is gone from the API: its directory goes once its processes have ended."""
        with self._lock:
            self._gone = True
            finished = self._finished
        if finished:
            shutil.rmtree(self.pod_dir, ignore_errors=True)

    # The thread's body: errors end the pod (reported), never the runner.
    def run(self) -> None:
        result: Result | None = None
        try:
            result = self._run()
        except Stopped:
            log.info("%s: stopped", self.key)
        except Exception as exc:
            log.exception("%s: runner error", self.key)
            result = (START_ERROR_CODE, "StartError", f"local pod runner: {exc}")
        try:
            # Sidecars (and whatever a failure left) end before the outcome is reported.
            self._stop_all()
            if result is not None and not self.stopping.is_set():
                self.runner.report(self.pod, result)
        finally:
            with self._lock:
                self._finished = True
                gone = self._gone
            if gone:
                shutil.rmtree(self.pod_dir, ignore_errors=True)
            self.runner.retire(self)

    def _check(self) -> None:
        if self.stopping.is_set():
            raise Stopped

    def _stop_all(self) -> None:
        with self._lock:
            if not self.stopping.is_set():
                self.kill_at = min(self.kill_at, time.monotonic() + self.default_grace)
            kill_at, procs = self.kill_at, list(self.running)
        threads = [threading.Thread(target=p.stop, args=(kill_at,)) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self._lock:
            self.running = []

    def _plan(self) -> Plan:
        """The plan, waiting (as a kubelet does) for Secrets and ConfigMaps that do not exist yet, and
        asking again after transient API errors."""
        needs = podplan.needs(self.pod)
        delay = 0.5
        while True:
            self._check()
            try:
                self.refs = self.runner.references(self.pod, needs)
                self.plan = podplan.plan(self.pod, self.runner.config, self.refs)
                self.refreshed_at = time.monotonic()
                return self.plan
            except MissingReference as exc:
                log.info("%s: waiting: %s", self.key, exc)
            except TRANSIENT as exc:
                log.warning("%s: reading what the pod refers to: %s; trying again", self.key, exc)
            if self.stopping.wait(delay):
                raise Stopped
            delay = min(delay * 2, 5.0)

    def _run(self) -> Result | None:
        """Run the pod; its outcome, or None while restartPolicy Always keeps it running."""
        try:
            plan = self._plan()
        except PlanError as exc:
            log.warning("%s: cannot run: %s", self.key, exc)
            return (START_ERROR_CODE, "StartError", str(exc))
        materialize(plan)
        log.info("%s: running on %s", self.key, plan.node)
        # Init containers are restarted on failure unless the pod's policy is Never.
        init_policy = "Never" if plan.restart_policy == "Never" else "OnFailure"
        for container in plan.init_containers:
            started = self._start(container)
            if container.sidecar:
                self.sidecars.append(started)
                continue
            (result,) = self._until_done([started], init_policy)
            if result[0] != 0:
                return result
        main = [self._start(c) for c in plan.containers]
        return podprotocol.pod_result(self._until_done(main, plan.restart_policy))

    def _start(self, container: ContainerPlan) -> _Container:
        process = Process(container, self.runner.config.cluster_dir)
        with self._lock:
            self._check()
            self.running.append(process)
        process.start()
        return _Container(process, self.runner.backoff[0])

    def _until_done(self, containers: Sequence[_Container], policy: str) -> list[Result]:
        """Supervise ``containers`` (and the sidecars) until each is done: exited, and not to be
        restarted under ``policy``. Sidecars are restarted whenever they exit."""
        while True:
            self._check()
            now = time.monotonic()
            for c in [*self.sidecars, *containers]:
                if c.result is not None:
                    continue
                if c.due is not None:
                    if now >= c.due:
                        c.due = None
                        c.process.start()
                    continue
                if c.process.poll() is None:
                    continue
                result = c.process.result()
                if not (
                    c.process.container.sidecar or policy == "Always" or (policy == "OnFailure" and result[0] != 0)
                ):
                    c.result = result
                    continue
                initial, most = self.runner.backoff
                if now - c.process.started_at > 2 * most:  # the kubelet forgets an old back-off
                    c.backoff = initial
                name, delay = c.process.container.name, c.backoff
                log.info("%s: %s exited %d; restarting in %.0fs", self.key, name, result[0], delay)
                c.due = now + delay
                c.backoff = min(delay * 2, most)
            results = [c.result for c in containers]
            if all(r is not None for r in results):
                return [r for r in results if r is not None]
            if now - self.refreshed_at >= self.runner.refresh:
                self._refresh()
            self.stopping.wait(POLL)

    def _refresh(self) -> None:
        """Write again the volume files whose Secret or ConfigMap changed, remove those of keys that
        went (the tokens are kept). Never ends the pod: a failure leaves the files as they were."""
        self.refreshed_at = time.monotonic()
        if self.plan is None or self.refs is None or not podplan.updatable(self.pod) or self.stopping.is_set():
            return
        needs = dataclasses.replace(podplan.needs(self.pod), audiences=frozenset())
        try:
            # The node's resources and the tokens as at the start: only the Secrets and ConfigMaps are read.
            read = self.runner.references(self.pod, needs, allocatable=self.refs.allocatable)
            refs = dataclasses.replace(read, tokens=self.refs.tokens)
            plan = podplan.plan(self.pod, self.runner.config, refs)
        except (PlanError, *TRANSIENT) as exc:  # a Secret deleted meanwhile: the files stay as they are
            log.debug("%s: volumes not refreshed: %s", self.key, exc)
            return
        if self.stopping.is_set():
            return
        writes, removals = podplan.refreshed(self.plan, plan)
        try:
            for file in writes:
                log.info("%s: %s changed", self.key, file.path.name)
                _write(file.path, file.data, file.mode)
            for path in removals:
                log.info("%s: %s removed", self.key, path.name)
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: volumes not refreshed: %s", self.key, exc)
            return
        self.plan = plan


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a file that has its final mode from the start (a temporary file, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def materialize(plan: Plan) -> None:
    """Create the plan's directories (the pod's own 0700) and write its files."""
    plan.pod_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    plan.pod_dir.chmod(0o700)
    for directory in plan.dirs:
        directory.mkdir(parents=True, exist_ok=True)
    for file in plan.files:
        _write(file.path, file.data, file.mode)
    for directory in plan.subpaths:
        if not directory.exists():
            directory.mkdir(parents=True, exist_ok=True)
    for path in plan.touch:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    for link, target in plan.links:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.readlink(link) != str(target):
            link.unlink()  # left by a run whose volumes were elsewhere
        if not link.is_symlink():
            link.symlink_to(target)


# -- the runner ----------------------------------------------------------------------------------


class PodRunner:
    """Watches every pod; runs the ones ``podprotocol.skip_reason`` lets through."""

    def __init__(
        self,
        config: RunnerConfig,
        core: kubernetes.client.CoreV1Api,
        *,
        backoff: tuple[float, float] = BACKOFF,
        refresh: float = REFRESH,
    ) -> None:
        self.config = config
        self.core = core
        self.backoff = backoff  # a restart's first delay and the most it doubles to
        self.refresh = refresh  # seconds between checks of a running pod's Secret and ConfigMap volumes
        self.workers: dict[str, PodWorker] = {}  # by pod uid, kept until the pod is gone
        self.nodes: set[str] = set()
        self._live: set[PodWorker] = set()  # workers whose thread has not ended, forgotten or not
        self._live_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- API reads and writes ------------------------------------------------------------------

    def references(
        self, pod: Mapping[str, Any], needs: podplan.Needs, allocatable: Mapping[str, str] | None = None
    ) -> References:
        """What the pod refers to, read from the API: its Secrets, ConfigMaps, a token per audience,
        and its node's allocatable resources unless ``allocatable`` is already known."""
        meta, spec = pod["metadata"], pod["spec"]
        namespace = meta["namespace"]
        secrets: dict[str, dict[str, bytes]] = {}
        config_maps: dict[str, dict[str, bytes]] = {}
        for name in needs.secrets:
            secret = self._read(self.core.read_namespaced_secret, name, namespace)
            if secret is not None:
                secrets[name] = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        for name in needs.config_maps:
            config_map = self._read(self.core.read_namespaced_config_map, name, namespace)
            if config_map is not None:
                data = {k: str(v).encode() for k, v in (config_map.get("data") or {}).items()}
                data.update({k: base64.b64decode(v) for k, v in (config_map.get("binaryData") or {}).items()})
                config_maps[name] = data
        tokens = {}
        account = spec.get("serviceAccountName") or "default"
        for audience in needs.audiences:
            body: Any = {
                "spec": {
                    "audiences": [audience] if audience else None,
                    "expirationSeconds": TOKEN_SECONDS,
                    "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]},
                }
            }
            try:
                reply: Any = self.core.create_namespaced_service_account_token(
                    account, namespace, body, _preload_content=False
                )
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    raise MissingReference(f"ServiceAccount {account!r} not found") from exc
                raise
            tokens[audience] = str(json.loads(reply.data)["status"]["token"])
        if allocatable is None:
            node = self._read(self.core.read_node, spec["nodeName"])
            allocatable = {k: str(v) for k, v in ((node or {}).get("status") or {}).get("allocatable", {}).items()}
        return References(secrets=secrets, config_maps=config_maps, tokens=tokens, allocatable=allocatable)

    def _read(self, method: Any, *args: str) -> dict[str, Any] | None:
        """The object as the API's JSON, or None if it does not exist."""
        try:
            response = method(*args, _preload_content=False)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data: dict[str, Any] = json.loads(response.data)
        return data

    def report(self, pod: Mapping[str, Any], result: Result) -> None:
        """Write the outcome where KWOK turns it into the pod's status."""
        meta = pod["metadata"]
        code, reason, message = result
        if pod["spec"].get("restartPolicy", "Always") == "Always":
            return  # never finishes; a kubelet would not report it either
        log.info("%s/%s: exit %d %s %s", meta["namespace"], meta["name"], code, reason, message[-200:])
        patch = podprotocol.outcome_patch(meta["uid"], code, reason, message)
        try:
            self.core.patch_namespaced_pod(meta["name"], meta["namespace"], patch)
        except kubernetes.client.ApiException as exc:
            # The pod is gone or replaced: nobody is waiting for this outcome.
            log.info("%s/%s: outcome not written: %s", meta["namespace"], meta["name"], exc.reason)

    def _simulated_nodes(self, wanted: str | None) -> set[str]:
        """The KWOK nodes; read again when a pod names one not seen yet (a pod that is Running gets
        no further events, so it must not be skipped for a stale list)."""
        if wanted and wanted not in self.nodes:
            listing = self._read(self.core.list_node)
            assert listing is not None  # a list is never "not found"
            self.nodes = {
                n["metadata"]["name"]
                for n in listing["items"]
                if (n["metadata"].get("annotations") or {}).get(KWOK_NODE_ANNOTATION) == "fake"
            }
        return self.nodes

    # -- events --------------------------------------------------------------------------------

    def handle(self, kind: str, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid", "")
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                worker.stop()
                self._forget(uid)
            return
        if meta.get("deletionTimestamp"):
            if worker is not None:
                # A deletion's grace while the pod runs; once KWOK has ended it (phase Failed) the
                # pod is removed with grace 0, which must not cut the grace short.
                running = (pod.get("status") or {}).get("phase") in ("Running", "Pending")
                worker.stop(float(podprotocol.grace_seconds(pod)) if running else None)
            return
        if worker is not None or not podprotocol.wants_run(pod):
            return
        reason = podprotocol.skip_reason(pod, self._simulated_nodes((pod.get("spec") or {}).get("nodeName")))
        if reason is not None:
            log.debug("%s/%s: not run: %s", meta.get("namespace"), meta.get("name"), reason)
            return
        worker = PodWorker(self, pod)
        self.workers[uid] = worker
        with self._live_lock:
            self._live.add(worker)
        worker.start()

    def process(self, uid: str, container: str) -> Process | None:
        """The running process of a pod's container (to crash it, as a test does to an engine)."""
        worker = self.workers.get(uid)
        return None if worker is None else worker.process(container)

    def restarts(self) -> dict[str, int]:
        """By ``namespace/pod/container``, of the pods still there: how many times each container
        was started again."""
        return {
            f"{worker.key}/{container}": count
            for worker in list(self.workers.values())
            for container, count in worker.restarts().items()
        }

    def retire(self, worker: PodWorker) -> None:
        """A worker's thread is ending."""
        with self._live_lock:
            self._live.discard(worker)

    def _forget(self, uid: str) -> None:
        """A pod gone from the API: once its processes have ended, its directory goes too."""
        worker = self.workers.pop(uid, None)
        if worker is not None:
            worker.forget()

    def _relist(self) -> str:
        listing = self._read(self.core.list_pod_for_all_namespaces)
        assert listing is not None  # a list is never "not found"
        present = set()
        for pod in listing["items"]:
            present.add(pod["metadata"]["uid"])
            self.handle("ADDED", pod)
        for uid in list(self.workers):
            if uid not in present:
                self.workers[uid].stop()
                self._forget(uid)
        return str(listing["metadata"]["resourceVersion"])

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._relist()
                while not self._stop.is_set():
                    # The stream raises ApiException for an ERROR event (410 Gone included).
                    stream = kubernetes.watch.Watch().stream(  # type: ignore[no-untyped-call]
                        self.core.list_pod_for_all_namespaces,
                        resource_version=version,
                        timeout_seconds=WATCH_SECONDS,
                    )
                    for event in stream:
                        raw = event["raw_object"]
                        version = raw["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self.handle(event["type"], raw)
                        if self._stop.is_set():
                            break
            except Exception as exc:  # a watch that broke is started again from a list
                log.info("pod watch: %s; listing again", exc)
                self._stop.wait(1.0)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pod-runner", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 10.0) -> None:
        """Stop watching and stop every pod's processes, those of deleted pods still in their grace
        period included: SIGTERM, SIGKILL ``grace`` seconds from now at the latest."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._live_lock:
            live = list(self._live)
        for worker in live:
            worker.stop(grace)
        for worker in live:
            worker.join()
        # Like a kubelet that goes, it leaves no pod's files (tokens, Secrets) behind; a runner
        # started again writes them anew for the pods still there.
        for worker in list(self.workers.values()):
            shutil.rmtree(worker.pod_dir, ignore_errors=True)


def config_for(root: Path, images: Mapping[str, Image]) -> RunnerConfig:
    """The runner's configuration for the dev cluster in ``root``."""
    from kimi_operator.devcluster.cluster import Cluster  # noqa: PLC0415 (keeps podplan tests light)

    cluster = Cluster(root)
    return RunnerConfig(
        cluster_dir=cluster.layout.root,
        images=images,
        server=cluster.server(),
        ca_file=cluster.layout.pki / "ca.crt",
        base_env=base_env(),
    )


@contextlib.contextmanager
def running(
    config: RunnerConfig,
    core: kubernetes.client.CoreV1Api,
    grace: float = 10.0,
    backoff: tuple[float, float] = BACKOFF,
) -> Iterator[PodRunner]:
    """A runner started for ``config``'s cluster (the processes a killed runner left stopped first),
    stopped on the way out with its pods' processes (SIGKILL ``grace`` seconds after SIGTERM)."""
    stop_leftovers(config.cluster_dir)
    runner = PodRunner(config, core, backoff=backoff)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop(grace)


def main(argv: Sequence[str] | None = None) -> int:
    from kimi_operator.devcluster.paths import repo_root, state_root  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="kimi-operator dev-cluster run-pods", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="cluster directory (default: .cluster in the checkout)")
    parser.add_argument("--images", help="YAML file mapping images to local programs (default: the project's)")
    args = parser.parse_args(argv)
    root = Path(args.dir) if args.dir else state_root()
    images = images_from_file(Path(args.images)) if args.images else images_from_env(repo_root())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = config_for(root, images)
    api = kubernetes.config.new_client_from_config(config_file=str(root / "kubeconfig"))  # type: ignore[no-untyped-call]
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    with running(config, kubernetes.client.CoreV1Api(api)):
        log.info("running pods annotated %s=true on the nodes of %s", podprotocol.RUN_ANNOTATION, root)
        done.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the router learns its LoraServer and engine pods: the Kubernetes API (a pod watch, and a
read of its LoraServer every period), or, outside a cluster, a spec file and a list of engines.

The Kubernetes client is synchronous: it runs in threads that hand results to the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from kimi_operator.api.base import GROUP, VERSION
from kimi_operator.api.loraserver import PLURAL
from kimi_operator.router.config import RouterConfig, from_object
from kimi_operator.router.fleet import Member, pod_member

log = logging.getLogger("kimi_operator.router.sources")

# The label that tells a dedicated (expert-adapter) engine pod from a shared one; render/loraserver.py
# writes it, and the router may not import it: a test pins the two together.
REPLICA_KIND_LABEL = f"{GROUP}/replica-kind"


class KubeSource:
    """Two threads: the engine pods (list, then watch), and the LoraServer (read every period)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        namespace: str,
        name: str,
        selector: str,
        on_members: Callable[[list[Member]], None],
        on_config: Callable[[RouterConfig], None],
        period: float = 2.0,
    ) -> None:
        self.loop, self.namespace, self.name, self.selector = loop, namespace, name, selector
        self.on_members, self.on_config, self.period = on_members, on_config, period
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._pods, name="pods", daemon=True),
            threading.Thread(target=self._loraserver, name="loraserver", daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()

    def _deliver_members(self, pods: Mapping[str, Mapping[str, Any]]) -> None:
        members = [m for p in pods.values() if (m := pod_member(p, kind_label=REPLICA_KIND_LABEL)) is not None]
        self.loop.call_soon_threadsafe(self.on_members, members)

    def _pods(self) -> None:
        import kubernetes  # noqa: PLC0415 (only the in-cluster source needs it)

        from kimi_operator.kubeconfig import load_client  # noqa: PLC0415

        # The client's own types say little; what is read is checked as it is used.
        api: Any = load_client()
        core: Any = kubernetes.client.CoreV1Api(api)
        watch_module: Any = kubernetes.watch
        selector = self.selector
        while not self.stopping.is_set():
            try:
                # Client-side bounds: a half-open connection to the apiserver must not freeze what
                # the router knows.
                listed = core.list_namespaced_pod(self.namespace, label_selector=selector, _request_timeout=(10, 60))
                pods = {p.metadata.name: api.sanitize_for_serialization(p) for p in listed.items}
                self._deliver_members(pods)
                watch = watch_module.Watch()
                for event in watch.stream(
                    core.list_namespaced_pod,
                    self.namespace,
                    label_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=60,
                    _request_timeout=(10, 90),
                ):
                    if self.stopping.is_set():
                        watch.stop()
                        break
                    obj = api.sanitize_for_serialization(event["object"])
                    name = (obj.get("metadata") or {}).get("name")
                    if not name:
                        continue
                    if event["type"] == "DELETED":
                        pods.pop(name, None)
                    else:
                        pods[name] = obj
                    self._deliver_members(pods)
            except Exception as exc:  # the watch ends or the apiserver is away: list again shortly
                log.warning("watching engine pods: %s", exc)
                self.stopping.wait(1.0)

    def _loraserver(self) -> None:
        import kubernetes  # noqa: PLC0415

        from kimi_operator.kubeconfig import load_client  # noqa: PLC0415

        custom: Any = kubernetes.client.CustomObjectsApi(load_client())
        last_error = None
        while not self.stopping.is_set():
            try:
                obj = custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=(10, 30)
                )
                config = from_object(obj)
            except Exception as exc:  # keep serving with what was read last
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if text != last_error:
                    log.warning("reading LoraServer %s/%s: %s", self.namespace, self.name, text)
                    last_error = text
            else:
                last_error = None
                self.loop.call_soon_threadsafe(self.on_config, config)
            self.stopping.wait(self.period)


def static_config(path: Path) -> RouterConfig:
    """A LoraServer manifest (YAML or JSON) read from a file, for a router outside a cluster."""
    text = path.read_text()
    obj = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    return from_object(obj)


def static_members(engines: list[str], dedicated: list[str]) -> list[Member]:
    """``name=url`` entries: shared engines, then dedicated (expert-adapter) ones."""
    members = []
    for entries, is_dedicated in ((engines, False), (dedicated, True)):
        for entry in entries:
            name, sep, url = entry.partition("=")
            if not sep or not url.startswith(("http://", "https://")):
                raise ValueError(f"engine {entry!r}: expected NAME=http://HOST:PORT")
            members.append(Member(name, url.rstrip("/"), True, is_dedicated))
    return members

"""The engines the router knows, and what each engine's own ``/v1/models`` lists.

Membership comes from the engine pods (or a static list); what each holds comes only from the
engine, polled on a short period, at once when a pod changes, and at once when an engine answers
that it lost an adapter or cannot be reached. A router that restarts knows nothing until it has
asked again: there is no state of its own to lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp

from kimi_operator.router.routing import Replica

log = logging.getLogger("kimi_operator.router.fleet")

# The expert replica's adapter before its engine listed one: it takes no request.
_UNKNOWN_EXPERT = "\x00unknown"


@dataclasses.dataclass(frozen=True)
class Member:
    """An engine as its pod (or the static list) describes it."""

    name: str
    url: str
    pod_ready: bool
    dedicated: bool


@dataclasses.dataclass
class Engine:
    member: Member
    up: bool = False
    listed: frozenset[str] = frozenset()
    # llama-server: each listed adapter's id, and every id it has (a request names them all).
    lora_ids: Mapping[str, int] = dataclasses.field(default_factory=dict)
    all_ids: tuple[int, ...] = ()
    in_flight: int = 0

    def replica(self) -> Replica:
        expert = None
        if self.member.dedicated:
            # A dedicated engine lists only the adapter it started with.
            expert = next(iter(sorted(self.listed)), _UNKNOWN_EXPERT)
        return Replica(
            name=self.member.name,
            url=self.member.url,
            ready=self.member.pod_ready and self.up,
            expert=expert,
            listed=self.listed,
            in_flight=self.in_flight,
        )


def pod_member(pod: Mapping[str, Any], *, kind_label: str, engine_container: str = "engine") -> Member | None:
    """An engine pod as the router sees it (None: not an engine yet, e.g. no IP)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or not meta.get("name"):
        return None
    port = 30000
    for container in spec.get("containers") or []:
        if container.get("name") == engine_container:
            for p in container.get("ports") or []:
                if p.get("name") == "http" and p.get("containerPort"):
                    port = int(p["containerPort"])
    ready = not meta.get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    dedicated = (meta.get("labels") or {}).get(kind_label) == "expert"
    host = f"[{ip}]" if ":" in ip else ip
    return Member(meta["name"], f"http://{host}:{port}", bool(ready), dedicated)


def lora_listing(body: Any, name_of: Callable[[str], str | None]) -> tuple[dict[str, int], tuple[int, ...]]:
    """llama-server's ``GET /lora-adapters`` ([{"id", "path", "scale"}]): each adapter it has, by the
    name ``name_of`` gives its file, and all its ids. Adapters are fixed at its start; a file no name
    is known for is still an id every request must set (to 0)."""
    if not isinstance(body, list):
        raise ValueError("not a /lora-adapters answer")
    ids: dict[str, int] = {}
    every: list[int] = []
    for entry in body:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise ValueError("not a /lora-adapters answer")
        every.append(int(entry["id"]))
        name = name_of(str(entry.get("path") or ""))
        if name is not None:
            ids[name] = int(entry["id"])
    return ids, tuple(sorted(every))


def listing(body: Any) -> frozenset[str]:
    """The adapters an engine's ``/v1/models`` lists: the cards that have a parent."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("not a /v1/models answer")
    return frozenset(
        str(card["id"]) for card in data if isinstance(card, dict) and card.get("parent") and card.get("id")
    )


# How the router asks an engine what it holds: SGLang's /v1/models, or llama.cpp's /lora-adapters.
ENGINE_APIS = ("sglang", "llamacpp")


class Fleet:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        period: float = 2.0,
        *,
        api: str = "sglang",
        name_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.session = session
        self.period = period
        self.api = api
        # llama.cpp: the adapter name of an adapter file the engine lists.
        self.name_of = name_of or (lambda path: None)
        self.engines: dict[str, Engine] = {}
        self._wake = asyncio.Event()

    def set_members(self, members: Iterable[Member]) -> None:
        """The engines that exist now; a changed or new one is asked at once."""
        found = {m.name: m for m in members}
        changed = False
        for name in list(self.engines):
            if name not in found:
                del self.engines[name]
                changed = True
        for name, member in found.items():
            engine = self.engines.get(name)
            if engine is None:
                self.engines[name] = Engine(member)
                changed = True
            elif engine.member != member:
                if engine.member.url != member.url:
                    # Another pod of the name: what the old one listed says nothing of it.
                    engine.up, engine.listed = False, frozenset()
                engine.member = member
                changed = True
        if changed:
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    def replicas(self) -> list[Replica]:
        return [e.replica() for e in self.engines.values()]

    def any_ready(self) -> bool:
        return any(r.ready for r in self.replicas())

    def served_adapters(self) -> set[str]:
        return {a for r in self.replicas() if r.ready for a in r.listed}

    def unreachable(self, name: str, error: str) -> None:
        """The router could not reach the engine: no request goes there until a poll says it is back."""
        engine = self.engines.get(name)
        if engine is not None and engine.up:
            log.warning("engine %s unreachable (%s): no request goes there until it answers again", name, error)
            engine.up = False
        self.wake()

    async def poll_one(self, engine: Engine) -> None:
        url = f"{engine.member.url}{'/lora-adapters' if self.api == 'llamacpp' else '/v1/models'}"
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with self.session.get(url, timeout=timeout) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                if self.api == "llamacpp":
                    engine.lora_ids, engine.all_ids = lora_listing(json.loads(raw), self.name_of)
                    listed = frozenset(engine.lora_ids)
                else:
                    listed = listing(json.loads(raw))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if engine.up:
                log.warning("engine %s: /v1/models failed (%s)", engine.member.name, exc)
            engine.up, engine.listed = False, frozenset()
        else:
            if not engine.up or listed != engine.listed:
                log.info("engine %s lists %s", engine.member.name, sorted(listed) or "no adapter")
            engine.up, engine.listed = True, listed

    async def poll_all(self) -> None:
        engines = list(self.engines.values())
        await asyncio.gather(*(self.poll_one(e) for e in engines))

    async def run(self) -> None:
        """Poll every engine each period, or at once when woken."""
        while True:
            self._wake.clear()
            await self.poll_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.period)

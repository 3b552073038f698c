"""What the router takes from its LoraServer and from the mounted key files (pure but for reading
those files).

The LoraServer says which names may be served (the gate: SGLang would serve any adapter it ever
loaded), the sampling defaults, the keys and what each may use, and each adapter's state for the
503 a client gets while no replica holds it. Which replica holds what comes from the engines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kimi_operator.api.loraserver import LoraServerSpec
from kimi_operator.router.keys import Scope

# Where the router pod mounts each Secret an API key lives in: <KEYS_MOUNT>/<secret>/<key>.
KEYS_MOUNT = "/keys"


@dataclasses.dataclass(frozen=True)
class KeyRef:
    id: str
    secret: str
    key: str
    models: frozenset[str]

    def file(self, root: Path) -> Path:
        return root / self.secret / self.key


@dataclasses.dataclass(frozen=True)
class AdapterState:
    state: str
    message: str | None


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    served: str
    adapters: frozenset[str]
    defaults: Mapping[str, Any]
    keys: tuple[KeyRef, ...] = ()
    states: Mapping[str, AdapterState] = dataclasses.field(default_factory=dict)
    max_body_bytes: int = 16 * 1024 * 1024
    # The adapter each file digest is (the spec's sha256, or the one the status reports).
    digests: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def adapter_of_file(self, path: str) -> str | None:
        """The adapter an engine's adapter file is: files live in the node cache under their digest
        (``<cache>/<sha256>/...``), so the directory names it."""
        parts = [p for p in path.split("/") if p]
        for part in reversed(parts[:-1]):
            if part in self.digests:
                return self.digests[part]
        return None

    def scope(self, ref: KeyRef) -> Scope:
        every = "*" in ref.models
        return Scope(
            key_id=ref.id,
            base=every or self.served in ref.models,
            adapters=frozenset(ref.models - {"*", self.served}),
            all_adapters=every,
        )

    def why_unavailable(self, adapter: str | None) -> str:
        """Words for a 503: what the LoraServer's status says of the target."""
        if adapter is None:
            return f"no ready replica serves the base model {self.served} yet"
        known = self.states.get(adapter)
        if known is None:
            return f"adapter {adapter} is not loaded on any ready replica yet"
        detail = f": {known.message}" if known.message else ""
        return f"adapter {adapter} is {known.state} on the LoraServer and loaded on no ready replica{detail}"


def sampling_defaults(spec: LoraServerSpec) -> dict[str, Any]:
    """The request fields of the spec's sampling defaults (OpenAI's names; min_p is SGLang's)."""
    s = spec.sampling
    found = {"temperature": s.temperature, "top_p": s.top_p, "min_p": s.min_p, "max_tokens": s.max_tokens}
    return {k: v for k, v in found.items() if v is not None}


def from_object(obj: Mapping[str, Any]) -> RouterConfig:
    """The router's view of a LoraServer object (spec and status as the apiserver returns them)."""
    spec = LoraServerSpec.model_validate(obj.get("spec") or {})
    status = obj.get("status") or {}
    states = {
        str(a["name"]): AdapterState(str(a.get("state") or "Pending"), a.get("message"))
        for a in status.get("adapters") or []
        if a.get("name")
    }
    keys = tuple(
        KeyRef(k.id, k.secret_key_ref.name, k.secret_key_ref.key, frozenset(k.models)) for k in spec.router.api_keys
    )
    names = frozenset(a.name for a in spec.adapters)
    digests = {a.sha256: a.name for a in spec.adapters if a.sha256}
    for a in status.get("adapters") or []:
        if a.get("sha256") and a.get("name") in names:
            digests.setdefault(str(a["sha256"]), str(a["name"]))
    # What the agents report their engines hold (their own fields, kept when a pass of the operator
    # writes no adapters, e.g. while its model is briefly not ready).
    for engine in status.get("engines") or []:
        for name, sha in (engine.get("loadedSha256") or {}).items():
            if sha and name in names:
                digests.setdefault(str(sha), str(name))
    return RouterConfig(
        served=spec.served_model_name,
        digests=digests,
        adapters=names,
        defaults=sampling_defaults(spec),
        keys=keys,
        states=states,
        max_body_bytes=spec.router.max_body_bytes,
    )


def read_keys(config: RouterConfig, root: Path) -> tuple[dict[str, Scope], list[str]]:
    """Each configured key's value from its mounted file -> its scope; and the problems (a key whose
    file is missing or empty is not accepted, and said so, without its value)."""
    keys: dict[str, Scope] = {}
    problems: list[str] = []
    for ref in config.keys:
        try:
            value = ref.file(root).read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(f"key {ref.id}: {ref.secret}/{ref.key} cannot be read ({exc.strerror})")
            continue
        except UnicodeDecodeError:
            problems.append(f"key {ref.id}: {ref.secret}/{ref.key} is not UTF-8 text")
            continue
        if not value:
            problems.append(f"key {ref.id}: {ref.secret}/{ref.key} is empty")
            continue
        if value in keys:
            # Two ids, one value: whichever scope won would be a silent choice.
            problems.append(f"keys {keys[value].key_id} and {ref.id} have the same value: {ref.id} is not accepted")
            continue
        keys[value] = config.scope(ref)
    return keys, problems

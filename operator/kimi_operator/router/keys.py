"""API keys and what each may use (pure).

Every presented key is compared with every known key in constant time, so the time an answer takes
says nothing about how close a guess was; keys themselves are never logged nor used as labels: a
key id stands for them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Mapping

from kimi_operator.router.names import Target


@dataclasses.dataclass(frozen=True)
class Scope:
    key_id: str
    base: bool
    adapters: frozenset[str]
    # All adapters of the server, present and future.
    all_adapters: bool = False

    def allows(self, target: Target) -> bool:
        if target.adapter is None:
            return self.base
        return self.all_adapters or target.adapter in self.adapters


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def authenticate(presented: str | None, keys: Mapping[str, Scope]) -> Scope | None:
    """The scope of the presented key, or None (401). Every key is compared, whatever matches."""
    found = None
    # Digests of equal length: the comparison time says nothing of the keys' lengths either.
    candidate = hashlib.sha256((presented or "").encode()).digest()
    for secret, scope in keys.items():
        if hmac.compare_digest(candidate, hashlib.sha256(secret.encode()).digest()) and presented and secret:
            found = scope
    return found


def admit(header: str | None, keys: Mapping[str, Scope], *, required: bool) -> tuple[int, Scope | None]:
    """(HTTP status, scope) of a request's key, before anything of the request is looked at: 200, or
    401 for no or a wrong key (so a client without a key learns nothing, not even which models
    exist). ``required``: keys are configured; a server with keys configured but none readable
    refuses everything, only one with none configured is open."""
    if not required:
        return 200, None
    scope = authenticate(bearer(header), keys)
    return (401, None) if scope is None else (200, scope)


def verdict(
    header: str | None, keys: Mapping[str, Scope], target: Target, *, required: bool | None = None
) -> tuple[int, Scope | None]:
    """:func:`admit`, then 403 for a key that may not use ``target``."""
    status, scope = admit(header, keys, required=bool(keys) if required is None else required)
    if scope is not None and not scope.allows(target):
        return 403, scope
    return status, scope

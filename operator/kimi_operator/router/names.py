"""What a request's ``model`` names, and what SGLang must be sent instead.

Clients send ``"<served>"`` (the base model), ``"<served>:<adapter>"`` (SGLang's own form) or the
bare ``"<adapter>"`` (the vLLM / KServe / gateway-API convention every tool uses). SGLang runs a
bare adapter name as the base model without a word (REFERENCE.md), so the router always sends
``"<served>:<adapter>"``, and only for adapters the LoraServer serves now: SGLang would reload any
name it has ever seen, so the router is the gate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection


@dataclasses.dataclass(frozen=True)
class Target:
    """The base model (``adapter`` None) or one adapter."""

    adapter: str | None

    def upstream(self, served: str) -> str:
        """The ``model`` SGLang is sent: never a bare adapter name."""
        return served if self.adapter is None else f"{served}:{self.adapter}"


BASE = Target(None)


def resolve(model: object, *, served: str, adapters: Collection[str]) -> Target | None:
    """The target ``model`` names, or None (an OpenAI ``model_not_found``)."""
    if not isinstance(model, str) or not model:
        return None
    if model == served:
        return BASE
    prefix, colon, name = model.partition(":")
    if colon:
        # Only this server's name before the colon: another base is another model.
        return Target(name) if prefix == served and name in adapters else None
    return Target(model) if model in adapters else None

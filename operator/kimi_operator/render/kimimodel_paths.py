"""Where a KimiModel's files live inside the pods."""

from __future__ import annotations

from kimi_operator.api.base import GROUP

MOUNT = "/models"
NODE_LABEL = f"{GROUP}/node"


def model_dir(namespace: str, name: str) -> str:
    return f"{MOUNT}/{namespace}/{name}"

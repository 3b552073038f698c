"""The label set every child object carries, and bounded label values."""

from __future__ import annotations

import hashlib

from kimi_operator.api.base import GROUP

MANAGED_BY = "app.kubernetes.io/managed-by"
COMPONENT = "app.kubernetes.io/component"
OPERATOR = "kimi-operator"
MAX_LABEL_VALUE = 63


def bounded(value: str, limit: int = MAX_LABEL_VALUE) -> str:
    """A label value of at most ``limit`` characters; longer ones keep a prefix and a hash suffix."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{value[: limit - 11].rstrip('-_.')}-{digest}"


def common(kind: str, name: str, component: str | None = None) -> dict[str, str]:
    """Labels of every object the operator creates for ``kind``/``name`` (and, given, which of its
    parts the object is)."""
    labels = {MANAGED_BY: OPERATOR, f"{GROUP}/{kind.lower()}": bounded(name)}
    if component is not None:
        labels[COMPONENT] = component
    return labels


def selector(labels: dict[str, str]) -> str:
    """A label selector matching exactly ``labels``."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))

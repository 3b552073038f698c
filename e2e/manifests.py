"""Valid base objects of each kind, and a helper to vary one field of them."""

from __future__ import annotations

import copy
from typing import Any

GROUP, VERSION = "kimi-operator.io", "v1alpha1"

KIMI_MODEL: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "KimiModel",
    "metadata": {"name": "kimi"},
    "spec": {
        "source": {"huggingFace": {"repo": "moonshotai/Kimi-K2.5", "revision": "0123abcd"}},
        "placement": {"nodeNames": ["gpu-4090-a", "gpu-4090-b"], "count": 2},
        "storage": {"hostPath": "/mnt/nvme/kimi"},
    },
}
FINE_TUNE_JOB: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "FineTuneJob",
    "metadata": {"name": "tune"},
    "spec": {"model": {"name": "kimi"}, "dataset": {"configMap": {"name": "data", "key": "train.jsonl"}}},
}
LORA_SERVER: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "LoraServer",
    "metadata": {"name": "serve"},
    "spec": {"model": {"name": "kimi"}, "adapters": [{"name": "support", "fineTuneJob": {"name": "tune"}}]},
}
PLURALS = {"KimiModel": "kimimodels", "FineTuneJob": "finetunejobs", "LoraServer": "loraservers"}

_DELETE = object()


def vary(base: dict[str, Any], path: str, value: Any = _DELETE) -> dict[str, Any]:
    """A copy of ``base`` with the dotted ``path`` set to ``value`` (or removed)."""
    doc = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    cursor = doc
    for key in parents:
        cursor = cursor.setdefault(key, {})
    if value is _DELETE:
        del cursor[leaf]
    else:
        cursor[leaf] = value
    return doc


def without() -> Any:
    return _DELETE

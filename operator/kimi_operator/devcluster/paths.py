"""Where the local control plane keeps its cache and state."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The checkout this package runs from (operator/kimi_operator/devcluster -> repo)."""
    return Path(__file__).resolve().parents[3]


def cache_root() -> Path:
    """Build cache shared by every checkout on the machine, outside any of them."""
    override = os.environ.get("KIMI_OPERATOR_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kimi-operator"


def state_root() -> Path:
    """Per-checkout runtime state of the dev cluster (certificates, etcd data, logs, PIDs)."""
    override = os.environ.get("KIMI_OPERATOR_CLUSTER_DIR")
    if override:
        return Path(override)
    return repo_root() / ".cluster"

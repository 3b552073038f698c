"""Simulated GPU nodes for KWOK, rendered from a profile file.

A profile says what a host looks like to the scheduler and to the operator's preflight: capacity,
allocatable, and the labels GPU Feature Discovery and Node Feature Discovery put on a real node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

# The nodes KWOK manages (and so the local pod runner's) carry this annotation with value "fake".
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"

REQUIRED_CAPACITY = ("cpu", "memory", "pods", "ephemeral-storage", "nvidia.com/gpu")


class ProfileError(ValueError):
    """The profile file is malformed; the message names the file and the entry."""


def _node(name: str, profile_name: str, profile: dict[str, Any], index: int, source: Path) -> dict[str, Any]:
    capacity = {k: str(v) for k, v in profile.get("capacity", {}).items()}
    missing = [k for k in REQUIRED_CAPACITY if k not in capacity]
    if missing:
        raise ProfileError(f"{source}: profile {profile_name!r} lacks capacity {', '.join(missing)}")
    allocatable = {**capacity, **{k: str(v) for k, v in profile.get("allocatable", {}).items()}}
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": name,
        "type": "kwok",
        "kimi-operator.io/node-profile": profile_name,
        **{k: str(v) for k, v in profile.get("labels", {}).items()},
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {
                KWOK_NODE_ANNOTATION: "fake",
                "kimi-operator.io/description": str(profile.get("description", "")),
            },
        },
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            # Each simulated host gets its own loopback address.
            "addresses": [
                {"type": "InternalIP", "address": f"127.1.0.{index + 1}"},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "kwok",
                "kubeProxyVersion": "kwok",
                "containerRuntimeVersion": "kwok",
                "kernelVersion": "kwok",
                "osImage": "kwok",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        },
    }


def render(path: Path) -> str:
    """A NodeList (JSON) for every node the profile file declares."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: {exc}") from exc
    profiles = doc.get("profiles") or {}
    items = []
    for index, entry in enumerate(doc.get("nodes") or []):
        profile_name = entry.get("profile")
        if profile_name not in profiles:
            raise ProfileError(f"{path}: nodes[{index}] ({entry.get('name')}) names unknown profile {profile_name!r}")
        items.append(_node(entry["name"], profile_name, profiles[profile_name], index, path))
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})

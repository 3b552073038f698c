"""The operator's Kubernetes API client: credentials and the calls reconcilers make.

Every write of a child object is a server-side apply under one field manager; status is applied
the same way, so fields owned by the workload pods (their progress) are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from kimi_operator.api.kinds import Kind
from kimi_operator.kubeconfig import load_client as load_config

__all__ = ["FIELD_MANAGER", "Kube", "load_config"]

FIELD_MANAGER = "kimi-operator"


class Kube:
    """Thin, typed wrappers over the calls the reconcilers need; objects go in and out as dicts."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.dynamic = DynamicClient(api)
        self._resources: dict[tuple[str, str], Any] = {}

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        if key not in self._resources:
            self._resources[key] = self.dynamic.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def _list(self, api_version: str, kind: str, namespace: str | None, selector: str | None) -> list[dict[str, Any]]:
        found = self.dynamic.get(self._resource(api_version, kind), namespace=namespace, label_selector=selector)
        items: list[dict[str, Any]] = found.to_dict().get("items") or []
        return items

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        resource = self._resource(obj["apiVersion"], obj["kind"])
        result = self.dynamic.server_side_apply(
            resource, body=dict(obj), field_manager=FIELD_MANAGER, force_conflicts=True
        )
        applied: dict[str, Any] = result.to_dict()
        return applied

    def apply_status(self, kind: Kind, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Server-side apply of the status fields the operator owns (lists merge by their keys)."""
        resource = self._resource(kind.api_version, kind.kind)
        body = {
            "apiVersion": kind.api_version,
            "kind": kind.kind,
            "metadata": {"name": name, "namespace": namespace},
            "status": dict(status),
        }
        self.dynamic.request(
            "patch",
            resource.path(name=name, namespace=namespace) + "/status",
            body=body,
            content_type="application/apply-patch+yaml",
            field_manager=FIELD_MANAGER,
            force=True,
        )

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.dynamic.get(
                self._resource(api_version, kind), name=name, namespace=namespace
            ).to_dict()
        except NotFoundError:
            return None
        return found

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("batch/v1", "Job", namespace, name)

    def list_nodes(self, selector: str | None = None) -> list[dict[str, Any]]:
        return self._list("v1", "Node", None, selector)

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self._list("batch/v1", "Job", namespace, selector)

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self._list("v1", "Pod", namespace, selector)

    def label_node(self, node: str, key: str, value: str | None) -> None:
        """Set (or, with None, remove) one label; a merge patch touches nothing else."""
        self.dynamic.patch(
            self._resource("v1", "Node"),
            name=node,
            body={"metadata": {"labels": {key: value}}},
            content_type="application/merge-patch+json",
        )

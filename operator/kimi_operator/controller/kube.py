"""The operator's Kubernetes API client: loading credentials and the calls reconcilers make."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes

from kimi_operator.api.base import GROUP, VERSION
from kimi_operator.api.kinds import Kind

FIELD_MANAGER = "kimi-operator"


def load_config() -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else the current kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient()


class Kube:
    """Thin, typed wrappers over the calls the reconcilers need."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def patch_status(self, kind: Kind, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """One merge patch of the status subresource (lists inside are replaced whole)."""
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            kind.plural,
            name,
            {"status": dict(status)},
            field_manager=FIELD_MANAGER,
            _content_type="application/merge-patch+json",
        )

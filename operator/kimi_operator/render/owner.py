"""The owning object of a child, and the per-object RBAC every workload pod gets."""

from __future__ import annotations

import dataclasses
from typing import Any

from kimi_operator.api.base import API_VERSION, GROUP
from kimi_operator.render.labels import common


@dataclasses.dataclass(frozen=True)
class Owner:
    """One of our objects as the controller observed it."""

    kind: str
    plural: str
    namespace: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, component: str) -> dict[str, Any]:
        """Metadata of a child: the common labels, its component, owned by this object."""
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": common(self.kind, self.name, component),
            "ownerReferences": [self.reference()],
        }


def status_rule(owner: Owner) -> dict[str, Any]:
    """Reading and patching this one object's status."""
    return {
        "apiGroups": [GROUP],
        "resources": [f"{owner.plural}/status"],
        "resourceNames": [owner.name],
        "verbs": ["get", "patch"],
    }


def account(owner: Owner, name: str, component: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ServiceAccount of this object's pods, with a Role of exactly ``rules`` bound to it."""
    meta = owner.metadata(name, component)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
        },
    ]


def status_rbac(owner: Owner, name: str, component: str) -> list[dict[str, Any]]:
    """A ServiceAccount whose only right is to read and patch this one object's status."""
    return account(owner, name, component, [status_rule(owner)])

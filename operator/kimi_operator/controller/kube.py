"""The operator's Kubernetes API client: credentials and the calls reconcilers make.

Every write of a child object is a server-side apply under one field manager; status is applied
the same way, so fields owned by the workload pods (their progress) are left alone.

Nothing is written that is already there: a child carries the digest of what was last applied to
it, and a pass that would apply the same again only reads. An idle cluster costs no writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import kubernetes
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import DynamicApiError, NotFoundError

from kimi_operator.api.kinds import Kind
from kimi_operator.kubeconfig import load_client as load_config
from kimi_operator.render.quantity import parse_quantity

__all__ = ["APPLIED_DIGEST", "FIELD_MANAGER", "Kube", "NotOurs", "Rejected", "controlled_by", "digest", "load_config"]

FIELD_MANAGER = "kimi-operator"
APPLIED_DIGEST = "kimi-operator.io/applied-digest"
# Refusals of what we sent, which sending it again cannot change: bad request, forbidden (RBAC,
# quota, admission), too large, invalid. Everything else (conflicts, throttling, expired
# credentials, timeouts, server errors) is retried.
_PERMANENT = {400, 403, 413, 422}


class Rejected(Exception):
    """The apiserver (or an admission webhook) refused a write; the message is its own."""

    def __init__(self, obj: Mapping[str, Any], exc: DynamicApiError) -> None:
        meta = obj.get("metadata") or {}
        where = "/".join(p for p in (meta.get("namespace"), meta.get("name")) if p)
        super().__init__(f"the apiserver refused {obj.get('kind')} {where}: {_message(exc)}")
        self.status = int(exc.status or 0)


def _message(exc: DynamicApiError) -> str:
    """The apiserver's own message from a Status body, not the whole request and response."""
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        return str(exc.reason or exc.status)
    return str(body.get("message") or exc.reason or exc.status)


def _refused(obj: Mapping[str, Any], exc: DynamicApiError) -> Exception:
    return Rejected(obj, exc) if int(exc.status or 0) in _PERMANENT else exc


class NotOurs(Exception):
    """A child of ours exists under the name, but it belongs to another object (an earlier one of
    the same name, orphaned or not yet collected): it is neither adopted nor overwritten."""

    def __init__(self, live: Mapping[str, Any], owner_uid: str) -> None:
        meta = live["metadata"]
        refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
        holder = f"{refs[0].get('kind')} uid {refs[0].get('uid')}" if refs else "no controller"
        super().__init__(
            f"{live.get('kind')} {meta.get('namespace')}/{meta['name']} exists but belongs to {holder}, not this "
            f"object (uid {owner_uid}): delete it (an orphan of an earlier object of the same name), or wait for "
            "the garbage collector to remove it"
        )


def controlled_by(live: Mapping[str, Any], owner_uid: str) -> bool:
    refs = (live.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == owner_uid for r in refs)


def _owner_uid(obj: Mapping[str, Any]) -> str | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((str(r["uid"]) for r in refs if r.get("controller") and r.get("uid")), None)


# What the apiserver leaves out of a stored object when it is what we sent.
_EMPTY: tuple[Any, ...] = (False, "", (), None)


def holds(live: Any, wanted: Any) -> bool:
    """Whether ``live`` has every field of ``wanted`` with the same value, as the apiserver stores
    it: fields it defaults are not ours and are ignored; empty and false values it drops count as
    kept; quantities it rewrites ("1000m" as "1", "2048Mi" as "2Gi") are compared as numbers;
    lists must match item by item."""
    if isinstance(wanted, Mapping):
        return isinstance(live, Mapping) and all(
            holds(live[k], v) if k in live else _dropped(v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return isinstance(live, list) and len(live) == len(wanted) and all(map(holds, live, wanted))
    if live == wanted:
        return True
    if isinstance(wanted, bool) or isinstance(live, bool):
        return False
    return str(live) == str(wanted) or _same_quantity(live, wanted)


def _dropped(value: Any) -> bool:
    return value in _EMPTY or (isinstance(value, list | dict) and not value)


def _same_quantity(live: Any, wanted: Any) -> bool:
    if not isinstance(live, str | int) or not isinstance(wanted, str | int):
        return False
    try:
        return parse_quantity(live) == parse_quantity(wanted)
    except (ValueError, ArithmeticError):
        return False


def _labelled_ours(live: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    """The live object carries the labels we render on this child (managed-by and its owner)."""
    want = (obj.get("metadata") or {}).get("labels") or {}
    have = (live.get("metadata") or {}).get("labels") or {}
    return bool(want) and all(have.get(k) == v for k, v in want.items())


def _version(live: Mapping[str, Any]) -> tuple[str, str]:
    """What changes when someone changes the object: its generation where it has one (so status
    writes of its own controller do not count), its resourceVersion otherwise."""
    meta = live.get("metadata") or {}
    generation = meta.get("generation")
    return str(meta.get("uid")), f"g{generation}" if generation else f"r{meta.get('resourceVersion')}"


def digest(obj: Mapping[str, Any]) -> str:
    """A short digest of a manifest, stable under key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


def _stamped(obj: Mapping[str, Any], value: str) -> dict[str, Any]:
    meta = dict(obj["metadata"])
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_DIGEST: value}
    return {**obj, "metadata": meta}


class Kube:
    """Thin, typed wrappers over the calls the reconcilers need; objects go in and out as dicts."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.dynamic = DynamicClient(api)
        self._resources: dict[tuple[str, str], Any] = {}
        # (apiVersion, kind, namespace, name) -> the version our last apply left it at. An object
        # changed by someone else since then is applied again although its digest annotation still
        # matches; after a restart the map is empty and the digest alone decides.
        self._applied: dict[tuple[str, str, str, str], tuple[str, str]] = {}

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
        """Server-side apply of ``obj``, unless the live object already holds exactly this.

        Returns the live object. A refusal that a retry cannot fix raises :class:`Rejected`.
        """
        meta = obj["metadata"]
        key = (obj["apiVersion"], obj["kind"], meta.get("namespace") or "", meta["name"])
        wanted = digest(obj)
        live = self.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        if live is not None:
            # An orphan of ours (no controller: its owner was deleted with --cascade=orphan, but it
            # carries our labels) is adopted: its whole content is ours to declare. Anything else of
            # that name (another controller's, or a user's own object) is never taken over.
            if _owner_uid(live) is not None or not _labelled_ours(live, obj):
                self._check_owner(live, obj)
            same = (live["metadata"].get("annotations") or {}).get(APPLIED_DIGEST) == wanted
            seen = self._applied.get(key)
            # Known since our last apply: unchanged if its version is. First seen since this
            # process started: unchanged if it still holds everything we declare (an edit made
            # while the operator was down leaves the digest annotation as it was).
            if same and (seen == _version(live) if seen is not None else holds(live, obj)):
                self._applied[key] = _version(live)
                return live
        applied = self._apply(_stamped(obj, wanted))
        self._applied[key] = _version(applied)
        return applied

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The live object, created from ``obj`` only when it does not exist; never updated here.

        For children whose spec cannot change once they exist (a Job's pod template, the
        configuration it reads): what a later operator version or an edit would render
        differently is not forced onto them. A live object of another owner raises NotOurs.
        """
        meta = obj["metadata"]
        live = self.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        if live is None:
            return self._apply(_stamped(obj, digest(obj)))
        self._check_owner(live, obj)
        return live

    @staticmethod
    def _check_owner(live: Mapping[str, Any], obj: Mapping[str, Any]) -> None:
        owner = _owner_uid(obj)
        if owner is not None and not controlled_by(live, owner):
            raise NotOurs(live, owner)

    def _apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        resource = self._resource(obj["apiVersion"], obj["kind"])
        try:
            result = self.dynamic.server_side_apply(
                resource, body=dict(obj), field_manager=FIELD_MANAGER, force_conflicts=True
            )
        except DynamicApiError as exc:
            raise _refused(obj, exc) from None
        applied: dict[str, Any] = result.to_dict()
        return applied

    def merge_patch(self, live: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of a few fields of ``live`` (those that may change on it)."""
        meta = live["metadata"]
        resource = self._resource(live["apiVersion"], live["kind"])
        try:
            result = self.dynamic.patch(
                resource,
                name=meta["name"],
                namespace=meta.get("namespace"),
                body=dict(patch),
                content_type="application/merge-patch+json",
                field_manager=FIELD_MANAGER,
            )
        except DynamicApiError as exc:
            raise _refused(live, exc) from None
        patched: dict[str, Any] = result.to_dict()
        return patched

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

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.dynamic.get(
                self._resource(api_version, kind), name=name, namespace=namespace
            ).to_dict()
        except NotFoundError:
            return None
        return found

    def list_objects(
        self, api_version: str, kind: str, namespace: str | None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Objects of a kind in ``namespace`` (None: in every namespace)."""
        return self._list(api_version, kind, namespace, selector)

    def delete(self, live: Mapping[str, Any]) -> None:
        """Delete a child (foreground: its pods go first); one already gone is not an error."""
        meta = live["metadata"]
        try:
            self.dynamic.delete(
                self._resource(live["apiVersion"], live["kind"]),
                name=meta["name"],
                namespace=meta.get("namespace"),
                body={"propagationPolicy": "Foreground"},
            )
        except NotFoundError:
            return
        except DynamicApiError as exc:
            raise _refused(live, exc) from None

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

"""Which node cache entries a deleted LoraServer may remove: only the digests no other LoraServer
asks for or has loaded (the cache is shared by every LoraServer on a node, keyed by digest)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from kimi_operator.api.loraserver import LoraServerSpec
from kimi_operator.controller.loraserver import Settings, finalize, reclaimable

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def server(
    uid: str, *, spec: Sequence[str] = (), status: Sequence[str] = (), loaded: Sequence[str] = ()
) -> dict[str, Any]:
    return {
        "metadata": {"uid": uid},
        "spec": {"adapters": [{"name": f"s{i}", "sha256": d} for i, d in enumerate(spec)]},
        "status": {
            "adapters": [{"name": f"t{i}", "sha256": d} for i, d in enumerate(status)],
            "engines": [{"name": "r0", "loadedSha256": {f"l{i}": d for i, d in enumerate(loaded)}}],
        },
    }


@pytest.mark.parametrize(
    ("me", "others", "removed"),
    [
        (server("1", spec=[A, B]), [], [A, B]),
        # Another server asks for B: it stays.
        (server("1", spec=[A, B]), [server("2", spec=[B])], [A]),
        # Another server's engine still holds C (an older export it serves): it stays.
        (server("1", status=[C]), [server("2", loaded=[C])], []),
        # What this server's engines loaded counts as its own, even when the spec moved on.
        (server("1", spec=[A], loaded=[D]), [], [A, D]),
        # The list of servers includes this one: it never protects its own digests.
        (server("1", spec=[A]), [server("1", spec=[A])], [A]),
        # Not a digest: never a path to remove.
        (server("1", spec=["../../etc"]), [], []),
    ],
    ids=["alone", "shared-spec", "shared-loaded", "own-loaded", "self-listed", "not-a-digest"],
)
def test_only_digests_no_other_server_uses_are_reclaimed(
    me: dict[str, Any], others: list[dict[str, Any]], removed: list[str]
) -> None:
    assert reclaimable(me, others) == removed


class FakeKube:
    """The few calls finalize makes, over lists of objects."""

    def __init__(self, objects: dict[str, list[dict[str, Any]]], job_outcome: str = "Complete") -> None:
        self.objects = objects
        self.deleted: list[str] = []
        self.created: list[dict[str, Any]] = []
        self.job_outcome = job_outcome

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return next((o for o in self.objects.get(kind, []) if o["metadata"]["name"] == name), None)

    def list_objects(
        self, api_version: str, kind: str, namespace: str | None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        return list(self.objects.get(kind, []))

    def delete(self, live: dict[str, Any]) -> None:
        self.deleted.append(live["metadata"]["name"])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.created.append(obj)
        return {**obj, "status": {"conditions": [{"type": self.job_outcome, "status": "True"}]}}


MODEL = {
    "metadata": {"name": "kimi", "namespace": "ml"},
    "spec": {"storage": {"hostPath": "/mnt/nvme"}},
    "status": {"nodes": [{"name": "n1", "phase": "Ready"}, {"name": "n2", "phase": "Ineligible"}]},
}


POD_METADATA = {"labels": {"team": "ml"}, "annotations": {"sidecar.istio.io/inject": "false"}}


def deleting(*, reclaim: str = "Delete", adapters: Sequence[str] = (A, B)) -> tuple[dict[str, Any], LoraServerSpec]:
    spec = {
        "model": {"name": "kimi"},
        "adapters": [{"name": f"a{i}", "path": f"/mnt/nvme/a{i}", "sha256": d} for i, d in enumerate(adapters)],
        "adapterCache": {"reclaimPolicy": reclaim},
        "podMetadata": POD_METADATA,
    }
    body = {"metadata": {"name": "serve", "namespace": "ml", "uid": "u1"}, "spec": spec, "status": {}}
    return body, LoraServerSpec.model_validate(spec)


SETTINGS = Settings(engine_image="engine:1", router_image="router:1", llamacpp_image="llamacpp:1")


def test_the_engines_end_before_their_cache_is_cleaned_and_a_failed_cleanup_does_not_hold_deletion() -> None:
    body, spec = deleting()
    other = {"metadata": {"name": "other", "namespace": "ml", "uid": "u2"}, "spec": {"adapters": []}, "status": {}}
    other["status"] = {"adapters": [{"name": "x", "sha256": B}]}
    kube = FakeKube(
        {
            "KimiModel": [MODEL],
            "StatefulSet": [{"metadata": {"name": "serve-shared"}}],
            "Pod": [{"metadata": {"name": "serve-shared-0"}}],
            "LoraServer": [body, other],
        }
    )
    # While an engine pod runs, its agent would copy the files back: the sets go, nothing is removed.
    waiting = finalize(kube, SETTINGS, body, spec)  # type: ignore[arg-type]
    assert kube.deleted == ["serve-shared"]
    assert kube.created == []
    assert waiting == ["1 engine pods to end before the adapter cache is cleaned"]
    # Once they are gone: one Job on the Ready node, removing only what no other server uses.
    kube.objects["Pod"] = []
    assert finalize(kube, SETTINGS, body, spec) == []  # type: ignore[arg-type]
    (job,) = kube.created
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "remove-model",
        f"--root=/models/adapter-cache/{A}",
    ]
    assert job["spec"]["activeDeadlineSeconds"] > 0
    # The LoraServer's pod metadata (a mesh's sidecar opt-out, a team label) reaches its cleanup pod.
    metadata = job["spec"]["template"]["metadata"]
    assert metadata["labels"]["team"] == "ml"
    assert metadata["annotations"] == POD_METADATA["annotations"]
    # A cleanup that failed (node gone, deadline passed) lets the object go.
    failing = FakeKube({**kube.objects}, job_outcome="Failed")
    assert finalize(failing, SETTINGS, body, spec) == []  # type: ignore[arg-type]
    running = FakeKube({**kube.objects}, job_outcome="Running")
    assert finalize(running, SETTINGS, body, spec) == [f"cleanup Job {job['metadata']['name']}"]  # type: ignore[arg-type]


def test_retain_touches_nothing() -> None:
    body, spec = deleting(reclaim="Retain")
    kube = FakeKube({"KimiModel": [MODEL], "Pod": [{"metadata": {"name": "p"}}]})
    assert finalize(kube, SETTINGS, body, spec) == []  # type: ignore[arg-type]
    assert kube.deleted == kube.created == []


def test_an_export_another_server_names_is_protected_before_it_reports_it() -> None:
    body, _ = deleting(adapters=(A, C))
    other = {
        "metadata": {"name": "other", "namespace": "ml", "uid": "u2"},
        "spec": {"adapters": [{"name": "t", "fineTuneJob": {"name": "tune"}}]},
    }
    assert reclaimable(body, [other], {"u2": {C}}) == [A]

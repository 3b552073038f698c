"""Publishing an exported adapter to the shared store, and where serving then finds it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kimi_operator.api.finetunejob import FineTuneJobSpec
from kimi_operator.api.loraserver import LoraServerSpec
from kimi_operator.render import finetunejob as render_ftj
from kimi_operator.render import loraserver as render_ls
from kimi_operator.workloads.train import adapter

WEIGHTS = b"weights" * 100
SHA = hashlib.sha256(WEIGHTS).hexdigest()


def exported(tmp_path: Path) -> Path:
    final = tmp_path / "out" / "adapter"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text("{}")
    (final / "adapter_model.safetensors").write_bytes(WEIGHTS)
    return final


def test_the_adapter_is_published_whole_under_its_digest(tmp_path: Path) -> None:
    store = tmp_path / "store"
    relative = adapter.publish(exported(tmp_path), store, namespace="ml", name="support")
    assert relative == f"ml/support/{SHA}"
    assert sorted(p.name for p in (store / relative).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # Nothing partial is left beside it.
    assert [p.name for p in (store / "ml" / "support").iterdir()] == [SHA]


def test_publishing_the_same_adapter_again_keeps_the_copy(tmp_path: Path) -> None:
    store = tmp_path / "store"
    final = exported(tmp_path)
    relative = adapter.publish(final, store, namespace="ml", name="support")
    before = (store / relative / "adapter_model.safetensors").stat().st_mtime_ns
    assert adapter.publish(final, store, namespace="ml", name="support") == relative
    assert (store / relative / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_a_partial_copy_of_an_interrupted_publish_is_replaced(tmp_path: Path) -> None:
    store = tmp_path / "store"
    leftover = store / "ml" / "support" / f".{SHA}.partial"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    relative = adapter.publish(exported(tmp_path), store, namespace="ml", name="support")
    assert (store / relative / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert not leftover.exists()


def ftj(**output: Any) -> FineTuneJobSpec:
    base = {"model": {"name": "kimi"}, "dataset": {"configMap": {"name": "d", "key": "k"}}, "output": output}
    return FineTuneJobSpec.model_validate(base)


def test_the_training_pod_mounts_the_volume_it_publishes_to() -> None:
    owner = render_ftj.owner("ml", "support", "uid")
    job = render_ftj.train_job(
        owner, ftj(publish={"persistentVolumeClaim": {"claimName": "adapters"}}), "n1", storage_path="/s", image="i"
    )
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["publish"] == {"name": "publish", "persistentVolumeClaim": {"claimName": "adapters"}}
    (container,) = pod["containers"]
    assert {"name": "publish", "mountPath": "/publish"} in container["volumeMounts"]
    assert "--publish-dir=/publish" in container["args"]
    assert "--publish-claim=adapters" in container["args"]
    assert "--publish-namespace=ml" in container["args"]
    plain = render_ftj.train_job(owner, ftj(), "n1", storage_path="/s", image="i")
    assert not any(a.startswith("--publish") for a in plain["spec"]["template"]["spec"]["containers"][0]["args"])


@pytest.mark.parametrize("store", [None, "adapters"])
def test_only_the_agent_mounts_the_adapter_store_and_read_only(store: str | None) -> None:
    spec = LoraServerSpec.model_validate(
        {"model": {"name": "kimi"}, **({"adapterStore": {"persistentVolumeClaim": {"name": store}}} if store else {})}
    )
    model = render_ls.ModelFacts(name="kimi", storage_path="/mnt/nvme", source_path=None)
    owner = render_ls.owner("ml", "serve", "uid")
    pod = render_ls.engine_set(owner, spec, model, name="serve-shared", replicas=1, image="e")["spec"]["template"][
        "spec"
    ]
    engine, agent = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    if store is None:
        assert "adapter-store" not in volumes
        assert not any(a.startswith("--store-dir") for a in agent["args"])
        return
    assert volumes["adapter-store"]["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
    assert {"name": "adapter-store", "mountPath": "/adapter-store", "readOnly": True} in agent["volumeMounts"]
    assert all(m["name"] != "adapter-store" for m in engine["volumeMounts"])
    assert "--store-dir=/adapter-store" in agent["args"]


def test_a_loraserver_reads_a_fine_tune_jobs_adapter_where_the_job_exported_it() -> None:
    """The node path comes from where the operator told the training pod to export (the job's name,
    whatever its adapterName), not from the path the pod reported (its own view of the storage)."""
    from kimi_operator.api.loraserver import Adapter  # noqa: PLC0415
    from kimi_operator.controller.loraserver import _from_fine_tune_job  # noqa: PLC0415

    job = {
        "metadata": {"name": "tune", "namespace": "ml"},
        "spec": {"model": {"name": "kimi"}, "output": {"adapterName": "support"}},
        "status": {
            "phase": "Succeeded",
            "adapter": {"sha256": SHA, "node": "n1", "path": "/somewhere/the/pod/saw/adapter", "expertLora": False},
        },
    }
    model = {"metadata": {"name": "kimi", "namespace": "ml"}, "spec": {}}
    found = _from_fine_tune_job(
        {"tune": job}, model, Adapter.model_validate({"name": "support", "fineTuneJob": {"name": "tune"}}), None
    )
    assert found.blocked is None
    assert found.files is not None
    assert (found.files.kind, found.files.node, found.sha256) == ("node", "n1", SHA)
    assert found.files.path == render_ftj.adapter_dir("ml", "kimi", "tune").removeprefix("/models/")
    assert found.files.path == "ml/kimi/finetune/tune/adapter"

"""The Argo CD health check the chart ships, run in gopher-lua (the VM Argo CD uses) on objects the
operator really produced: Healthy, Progressing, Suspended and Degraded as kstatus' rules say."""

from __future__ import annotations

import copy
import json
import subprocess
from typing import Any

import kubernetes
import pytest
import yaml

from e2e.conftest import OperatorProcess
from e2e.helpers import wait_for
from e2e.manifests import GROUP, LORA_SERVER, VERSION
from e2e.test_finetunejob import HOLD, SMALL, custom, ftj, get, ready_model, wait_phase
from kimi_operator.devcluster import build
from kimi_operator.devcluster.paths import repo_root

pytestmark = pytest.mark.e2e

ARGOCD = repo_root() / "charts" / "kimi-operator" / "argocd"
KINDS = ("KimiModel", "FineTuneJob", "LoraServer")


def health(obj: dict[str, Any]) -> dict[str, str]:
    proc = subprocess.run(
        [str(build.binary("luahealth")), str(ARGOCD / "health.lua")],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, str] = json.loads(proc.stdout)
    return result


def test_the_argocd_cm_patch_carries_the_health_check_for_every_kind() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    script = (ARGOCD / "health.lua").read_text()
    assert patch["data"] == {f"resource.customizations.health.{GROUP}_{kind}": script for kind in KINDS}


def test_health_of_real_objects(api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess) -> None:
    # An RTX node: the H200 node stays whole for the test that needs all its eight GPUs.
    ready_model(api, namespace, node="gpu-4090-a")
    model = get(api, namespace, "kimimodels", "kimi")
    assert health(model)["status"] == "Healthy"

    bad = {
        "labels": {"sim.kimi-operator.io/fail": "true"},
        "annotations": {"sim.kimi-operator.io/exit-code": "20", "sim.kimi-operator.io/message": "line 3: bad JSON"},
    }
    jobs = {
        "running": {"podMetadata": HOLD, "resources": SMALL},
        "held": {"suspend": True, "resources": SMALL},
        "broken": {"podMetadata": bad, "resources": SMALL},
    }
    for name, spec in jobs.items():
        custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", ftj(name, **spec))
    assert health(wait_phase(api, namespace, "running", "Running")) == {
        "status": "Progressing",
        "message": "Training: attempt 1 running on gpu-4090-a",
    }
    assert health(wait_phase(api, namespace, "held", "Suspended")) == {
        "status": "Suspended",
        "message": "spec.suspend is true",
    }
    assert health(wait_phase(api, namespace, "broken", "Failed")) == {
        "status": "Degraded",
        "message": "InvalidDataset: line 3: bad JSON",
    }

    # A LoraServer whose engines are starting (the model holds the BF16 variant it serves from) is
    # Progressing; one whose kt method needs a variant the model does not prepare is Degraded.
    for name, method in (("serving", "BF16"), ("no-variant", "AMXINT8")):
        server = copy.deepcopy(LORA_SERVER)
        server["metadata"]["name"] = name
        server["spec"]["engine"] = {"ktMethod": method}
        server["spec"]["resources"] = {"gpus": 1, "cpu": "4", "memory": "16Gi"}
        custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", server)
    served = wait_for(
        lambda: (o := get(api, namespace, "loraservers", "serving")).get("status", {}).get("observedGeneration") and o,
        60,
        "LoraServer observed",
    )
    assert health(served)["status"] == "Progressing"
    refused = wait_for(
        lambda: (
            (o := get(api, namespace, "loraservers", "no-variant")).get("status", {}).get("observedGeneration") and o
        ),
        60,
        "LoraServer observed",
    )
    assert health(refused)["status"] == "Degraded"
    assert health(refused)["message"].startswith("VariantMissing: engine.ktMethod AMXINT8 serves from the cpu-int8")

    # The same healthy model while it is deleted, and after a spec change the operator has not seen.
    deleting = {**model, "metadata": {**model["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert health(deleting) == {"status": "Progressing", "message": "Being deleted"}
    ahead = {**model, "metadata": {**model["metadata"], "generation": model["metadata"]["generation"] + 1}}
    assert health(ahead)["status"] == "Progressing"
    assert "has not acted on generation" in health(ahead)["message"]
    assert health({"metadata": {"name": "new", "generation": 1}}) == {
        "status": "Progressing",
        "message": "Waiting for the operator",
    }

from typing import Any

import pytest

from kimi_operator.api.exitcodes import PrepareExit
from kimi_operator.api.kimimodel import KimiModelSpec
from kimi_operator.render import kimimodel as render
from kimi_operator.render.quantity import parse_quantity

OWNER = render.owner("ml", "kimi", "uid-1")
AMX = {f"feature.node.kubernetes.io/cpu-cpuid.{f}": "true" for f in ("AVX512F", "AVX512BW", "AMXINT8")}


def spec(**overrides: Any) -> KimiModelSpec:
    base: dict[str, Any] = {
        "source": {"huggingFace": {"repo": "moonshotai/Kimi-K2.5", "revision": "abc"}},
        "placement": {"nodeNames": ["n1"]},
        "storage": {"hostPath": "/mnt/nvme/kimi"},
    }
    return KimiModelSpec.model_validate({**base, **overrides})


def node(**overrides: Any) -> render.NodeFacts:
    facts: dict[str, Any] = {
        "name": "n1",
        "labels": AMX,
        "allocatable": {"nvidia.com/gpu": "2", "memory": "1008Gi", "cpu": "94"},
        "ready": True,
        "unschedulable": False,
    }
    facts.update(overrides)
    return render.NodeFacts(**facts)


@pytest.mark.parametrize(
    ("facts", "variants", "reason"),
    [
        (node(), ["bf16", "cpu-int8"], None),
        (node(ready=False), ["bf16"], "node is not Ready"),
        (node(unschedulable=True), ["bf16"], "node is cordoned (unschedulable)"),
        (node(allocatable={"nvidia.com/gpu": "0"}), ["bf16"], "node has no allocatable nvidia.com/gpu"),
        (node(allocatable={}), ["bf16"], "node has no allocatable nvidia.com/gpu"),
        (node(labels={}), ["bf16"], None),  # BF16 needs no CPU features
        (node(labels={}), ["cpu-int4"], "the node lacks AVX512F, AVX512BW"),
        (
            node(allocatable={"nvidia.com/gpu": "8", "memory": "32Gi"}),
            ["bf16"],
            "requests memory 64Gi, node allocatable is 32Gi",
        ),
        (node(allocatable={"nvidia.com/gpu": "8", "cpu": "8"}), ["bf16"], "requests cpu 16, node allocatable is 8"),
    ],
)
def test_eligibility(facts: render.NodeFacts, variants: list[str], reason: str | None) -> None:
    why = render.ineligible_reason(facts, spec(variants=variants))
    if reason is None:
        assert why is None
    else:
        assert why is not None
        assert reason in why


def test_quantities_compare_across_units() -> None:
    assert parse_quantity("1Ti") == parse_quantity("1024Gi")
    assert parse_quantity("500m") < parse_quantity("1")
    assert parse_quantity(16) == parse_quantity("16")
    assert parse_quantity("1e3") == parse_quantity("1k")


def test_model_label_is_bounded_and_distinct() -> None:
    short = render.model_label("ml", "kimi")
    assert short == "kimi-operator.io/model.ml.kimi"
    long_a = render.model_label("n" * 40, "m" * 40)
    long_b = render.model_label("n" * 40, "m" * 39 + "x")
    assert len(long_a.split("/", 1)[1]) == 63
    assert long_a != long_b


def test_job_names_change_with_variants_and_fit_63() -> None:
    a = render.job_name("kimi", "n1", ["bf16"])
    assert a == render.job_name("kimi", "n1", ["bf16"])
    assert a != render.job_name("kimi", "n1", ["bf16", "cpu-int8"])
    assert a != render.job_name("kimi", "n2", ["bf16"])
    assert len(render.job_name("k" * 63, "n1", ["bf16"])) <= 63


def test_prepare_job_for_a_hub_source() -> None:
    s = spec(
        source={"huggingFace": {"repo": "o/r", "revision": "abc", "tokenSecretRef": {"name": "hf", "key": "t"}}},
        variants=["bf16", "cpu-int4"],
        podMetadata={"labels": {"team": "ml"}},
    )
    job = render.prepare_job(OWNER, s, "n1", image="img:1")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}]}
    ]
    assert container["args"] == [
        "prepare",
        "--root=/models/ml/kimi",
        "--variants=bf16,cpu-int4",
        "--report=ml/kimi",
        "--node=$(NODE_NAME)",
        "--download-concurrency=8",
        "--repo=o/r",
        "--revision=abc",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "t"}}
    assert env["PREPARE_THREADS"]["valueFrom"] == {"resourceFieldRef": {"resource": "limits.cpu"}}
    assert pod["volumes"] == [{"name": "models", "hostPath": {"path": "/mnt/nvme/kimi", "type": "DirectoryOrCreate"}}]
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    codes = job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"]
    assert codes == [int(c) for c in PrepareExit]
    assert all(c >= 10 for c in codes)


def test_prepare_job_for_a_local_path_mounts_it_read_only() -> None:
    job = render.prepare_job(OWNER, spec(source={"path": {"path": "/data/kimi"}}), "n1", image="img:1")
    pod = job["spec"]["template"]["spec"]
    assert {"name": "source", "hostPath": {"path": "/data/kimi", "type": "Directory"}} in pod["volumes"]
    assert {"name": "source", "mountPath": "/source", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert "--source-path=/source" in pod["containers"][0]["args"]
    assert "HF_TOKEN" not in {e["name"] for e in pod["containers"][0]["env"]}


def test_prepare_rbac_is_limited_to_this_objects_status() -> None:
    sa, role, binding = render.prepare_rbac(OWNER)
    assert sa["kind"] == "ServiceAccount"
    assert role["rules"] == [
        {
            "apiGroups": ["kimi-operator.io"],
            "resources": ["kimimodels/status"],
            "resourceNames": ["kimi"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kimi-prepare", "namespace": "ml"}]


def test_cleanup_job_outlives_the_model() -> None:
    job = render.cleanup_job(
        OWNER, spec(storage={"hostPath": "/mnt/nvme/kimi", "reclaimPolicy": "Delete"}), "n1", image="img:1"
    )
    assert "ownerReferences" not in job["metadata"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["remove-model", "--root=/models/ml/kimi"]

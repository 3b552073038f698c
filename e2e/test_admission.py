"""Invalid objects are refused by the real apiserver (schema + CEL), each naming the field."""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest

from e2e.helpers import api_error, wait_for
from e2e.manifests import FINE_TUNE_JOB, GROUP, KIMI_MODEL, LORA_SERVER, PLURALS, VERSION, vary, without

pytestmark = pytest.mark.e2e

# (case id, object, field the error must name, words the message must hold)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    # KimiModel
    ("km-no-source", vary(KIMI_MODEL, "spec.source", without()), "spec.source", "Required"),
    ("km-no-storage", vary(KIMI_MODEL, "spec.storage", without()), "spec.storage", "Required"),
    ("km-no-spec", vary(KIMI_MODEL, "spec", without()), "spec", "Required"),
    ("km-count-type", vary(KIMI_MODEL, "spec.placement.count", "two"), "spec.placement.count", "integer"),
    (
        "km-count-zero",
        vary(KIMI_MODEL, "spec.placement.count", 0),
        "spec.placement.count",
        "greater than or equal to 1",
    ),
    ("km-count-huge", vary(KIMI_MODEL, "spec.placement.count", 65), "spec.placement.count", "less than or equal to 64"),
    (
        "km-count-over-names",
        vary(KIMI_MODEL, "spec.placement.count", 3),
        "spec.placement.count",
        "count must not exceed the number of nodeNames",
    ),
    (
        "km-two-placements",
        vary(KIMI_MODEL, "spec.placement.nodeSelector", {"matchLabels": {"a": "b"}}),
        "spec.placement",
        "exactly one of nodeNames or nodeSelector",
    ),
    (
        "km-no-source-kind",
        vary(KIMI_MODEL, "spec.source", {}),
        "spec.source",
        "exactly one of huggingFace or path",
    ),
    (
        "km-two-sources",
        vary(KIMI_MODEL, "spec.source.path", {"path": "/models/kimi"}),
        "spec.source",
        "exactly one of huggingFace or path",
    ),
    (
        "km-relative-path",
        vary(KIMI_MODEL, "spec.storage.hostPath", "nvme/kimi"),
        "spec.storage.hostPath",
        "should match",
    ),
    ("km-bad-variant", vary(KIMI_MODEL, "spec.variants", ["fp32"]), "spec.variants[0]", "Unsupported value"),
    ("km-dup-variant", vary(KIMI_MODEL, "spec.variants", ["bf16", "bf16"]), "spec.variants[1]", "Duplicate value"),
    (
        "km-gguf-without-source",
        vary(KIMI_MODEL, "spec.variants", ["gguf"]),
        "spec.gguf",
        "spec.gguf is required with the gguf variant",
    ),
    (
        "km-gguf-without-variant",
        vary(
            KIMI_MODEL,
            "spec.gguf",
            {"huggingFace": {"repo": "unsloth/Kimi-K2.5-GGUF", "revision": "abc"}, "quantization": "UD-TQ1_0"},
        ),
        "spec.gguf",
        "spec.gguf is required with the gguf variant, and only with it",
    ),
    (
        "km-gguf-bad-quantization",
        vary(
            vary(KIMI_MODEL, "spec.variants", ["gguf"]),
            "spec.gguf",
            {"huggingFace": {"repo": "unsloth/Kimi-K2.5-GGUF", "revision": "abc"}, "quantization": "../x"},
        ),
        "spec.gguf.quantization",
        "should match",
    ),
    (
        "km-bad-quantity",
        vary(KIMI_MODEL, "spec.resources", {"memory": "lots"}),
        "spec.resources.memory",
        "Kubernetes quantity",
    ),
    (
        "km-bad-repo",
        vary(KIMI_MODEL, "spec.source.huggingFace.repo", "no-owner"),
        "spec.source.huggingFace.repo",
        "match",
    ),
    ("km-long-name", vary(KIMI_MODEL, "metadata.name", "k" * 64), "metadata.name", "may not be more than 63 bytes"),
    # FineTuneJob
    ("ftj-no-model", vary(FINE_TUNE_JOB, "spec.model", without()), "spec.model", "Required"),
    ("ftj-no-dataset-source", vary(FINE_TUNE_JOB, "spec.dataset", {}), "spec.dataset", "exactly one of configMap"),
    (
        "ftj-two-dataset-sources",
        vary(FINE_TUNE_JOB, "spec.dataset.hostPath", {"path": "/data/train.jsonl"}),
        "spec.dataset",
        "exactly one of configMap",
    ),
    ("ftj-rank-zero", vary(FINE_TUNE_JOB, "spec.lora", {"rank": 0}), "spec.lora.rank", "greater than or equal to 1"),
    (
        "ftj-alpha-negative",
        vary(FINE_TUNE_JOB, "spec.lora", {"alpha": -4}),
        "spec.lora.alpha",
        "greater than or equal to 1",
    ),
    ("ftj-dropout-one", vary(FINE_TUNE_JOB, "spec.lora", {"dropout": 1.0}), "spec.lora.dropout", "less than 1"),
    (
        "ftj-lr-zero",
        vary(FINE_TUNE_JOB, "spec.training", {"learningRate": 0}),
        "spec.training.learningRate",
        "greater than 0",
    ),
    (
        "ftj-save-before-log",
        vary(FINE_TUNE_JOB, "spec.training", {"loggingSteps": 50, "saveSteps": 10}),
        "spec.training.saveSteps",
        "saveSteps must be at least loggingSteps",
    ),
    ("ftj-gpus-type", vary(FINE_TUNE_JOB, "spec.resources", {"gpus": "two"}), "spec.resources.gpus", "integer"),
    ("ftj-bad-queue", vary(FINE_TUNE_JOB, "spec.queueName", "Bad_Queue"), "spec.queueName", "should match"),
    (
        "ftj-messages-key",
        vary(FINE_TUNE_JOB, "spec.dataset.messagesKey", "turns"),
        "spec.dataset.messagesKey",
        "Unsupported value",
    ),
    # LoraServer
    (
        "lsrv-adapter-is-base",
        vary(LORA_SERVER, "spec.adapters", [{"name": "kimi-k2.5", "path": "/a"}]),
        "spec.adapters",
        "must differ from servedModelName",
    ),
    (
        "lsrv-dup-adapters",
        vary(LORA_SERVER, "spec.adapters", [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]),
        "spec.adapters[1]",
        "Duplicate value",
    ),
    (
        "lsrv-adapter-two-sources",
        vary(LORA_SERVER, "spec.adapters", [{"name": "a", "path": "/a", "fineTuneJob": {"name": "t"}}]),
        "spec.adapters[0]",
        "exactly one of fineTuneJob, path or huggingFace",
    ),
    (
        "lsrv-adapter-colon",
        vary(LORA_SERVER, "spec.adapters", [{"name": "a:b", "path": "/a"}]),
        "spec.adapters[0].name",
        "should match",
    ),
    (
        "lsrv-expert-from-ftj",
        vary(LORA_SERVER, "spec.adapters", [{"name": "a", "fineTuneJob": {"name": "t"}, "expert": True}]),
        "spec.adapters[0].expert",
        "known from the FineTuneJob",
    ),
    (
        "lsrv-expert-pinned",
        vary(LORA_SERVER, "spec.adapters", [{"name": "a", "path": "/a", "expert": True, "pinned": True}]),
        "spec.adapters[0].pinned",
        "pinned applies to shared adapters only",
    ),
    (
        "lsrv-dedicated-shared",
        vary(LORA_SERVER, "spec.adapters", [{"name": "a", "path": "/a", "expert": False, "dedicatedReplicas": 2}]),
        "spec.adapters[0].dedicatedReplicas",
        "expert adapters only",
    ),
    (
        "lsrv-expert-no-digest",
        vary(LORA_SERVER, "spec.adapters", [{"name": "a", "path": "/a", "expert": True}]),
        "spec.adapters[0].sha256",
        "set sha256",
    ),
    (
        "lsrv-too-many-pinned",
        vary(
            vary(LORA_SERVER, "spec.engine", {"maxLorasPerBatch": 2}),
            "spec.adapters",
            [{"name": "a", "path": "/a", "pinned": True}, {"name": "b", "path": "/b", "pinned": True}],
        ),
        "spec.adapters",
        "at most engine.maxLorasPerBatch - 1 adapters can be pinned",
    ),
    (
        "lsrv-all-and-more",
        vary(LORA_SERVER, "spec.engine", {"loraTargetModules": ["all", "q_proj"]}),
        "spec.engine.loraTargetModules",
        "`all` must be the only entry",
    ),
    (
        "lsrv-extra-arg-overrides",
        vary(LORA_SERVER, "spec.engine", {"extraArgs": ["--kt-num-gpu-experts=30"]}),
        "spec.engine.extraArgs",
        "may not repeat a flag the operator renders",
    ),
    (
        "lsrv-method-without-variant",
        vary(LORA_SERVER, "spec.engine", {"ktMethod": "FP8"}),
        "spec.engine.ktMethod",
        "Unsupported value",
    ),
    (
        "lsrv-loaded-below-batch",
        vary(LORA_SERVER, "spec.engine", {"maxLorasPerBatch": 8, "maxLoadedLoras": 4}),
        "spec.engine.maxLoadedLoras",
        "at least maxLorasPerBatch",
    ),
    (
        "lsrv-prefill-threshold-method",
        vary(LORA_SERVER, "spec.engine", {"ktMethod": "AMXINT8", "ktGpuPrefillTokenThreshold": 1024}),
        "spec.engine.ktGpuPrefillTokenThreshold",
        "only to the RAWINT4 method",
    ),
    (
        "lsrv-llamacpp-settings-for-sglang",
        vary(LORA_SERVER, "spec.engine", {"llamacpp": {"parallel": 2}}),
        "spec.engine.llamacpp",
        "only with engine.type llamacpp",
    ),
    (
        "lsrv-llamacpp-expert",
        vary(
            vary(LORA_SERVER, "spec.engine", {"type": "llamacpp"}),
            "spec.adapters",
            [{"name": "a", "path": "/a", "expert": True, "sha256": "a" * 64}],
        ),
        "spec.adapters",
        "expert adapters need engine.type sglang",
    ),
    (
        "lsrv-llamacpp-path-no-digest",
        vary(vary(LORA_SERVER, "spec.engine", {"type": "llamacpp"}), "spec.adapters", [{"name": "a", "path": "/a"}]),
        "spec.adapters",
        "needs sha256",
    ),
    (
        "lsrv-llamacpp-context",
        vary(LORA_SERVER, "spec.engine", {"type": "llamacpp", "llamacpp": {"contextSize": 100}}),
        "spec.engine.llamacpp.contextSize",
        "greater than or equal to 256",
    ),
    ("lsrv-negative-replicas", vary(LORA_SERVER, "spec.replicas", -1), "spec.replicas", "greater than or equal to 0"),
    (
        "lsrv-hot",
        vary(LORA_SERVER, "spec.sampling", {"temperature": 3}),
        "spec.sampling.temperature",
        "less than or equal to 2",
    ),
    (
        "lsrv-old-api-key",
        vary(LORA_SERVER, "spec.router", {"apiKeySecretRef": {"name": "k", "key": "key"}}),
        "spec.router.apiKeySecretRef",
        "replaced by apiKeys",
    ),
    (
        "lsrv-one-secret-key-two-ids",
        vary(
            LORA_SERVER,
            "spec.router",
            {
                "apiKeys": [
                    {"id": "a", "secretKeyRef": {"name": "k", "key": "key"}, "models": ["*"]},
                    {"id": "b", "secretKeyRef": {"name": "k", "key": "key"}, "models": ["kimi-k2.5"]},
                ]
            },
        ),
        "spec.router.apiKeys",
        "each key needs its own",
    ),
    (
        "lsrv-key-model-with-colon",
        vary(
            LORA_SERVER,
            "spec.router",
            {"apiKeys": [{"id": "a", "secretKeyRef": {"name": "k", "key": "key"}, "models": ["kimi-k2.5:x"]}]},
        ),
        "spec.router.apiKeys[0].models[0]",
        "should match",
    ),
    (
        "lsrv-huge-body",
        vary(LORA_SERVER, "spec.router", {"maxBodyBytes": 1073741824}),
        "spec.router.maxBodyBytes",
        "less than or equal to 268435456",
    ),
]


def create(api: kubernetes.client.ApiClient, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    custom = kubernetes.client.CustomObjectsApi(api)
    result: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[obj["kind"]], obj, field_validation="Strict"
    )
    return result


def test_invalid_cases_cover_at_least_25_distinct_fields() -> None:
    assert len(INVALID) >= 25
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("obj", "field", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_object_is_rejected_naming_the_field(
    api: kubernetes.client.ApiClient, namespace: str, obj: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(kubernetes.client.ApiException) as info:
        create(api, namespace, obj)
    assert info.value.status == 422, info.value.body
    message, fields = api_error(info.value)
    assert field in fields or f"{field}:" in message, (field, fields, message)
    assert words in message, message


def test_unknown_field_from_the_stale_guide_is_refused(api: kubernetes.client.ApiClient, namespace: str) -> None:
    obj = vary(FINE_TUNE_JOB, "spec.training", {"cpu_infer": 32})
    with pytest.raises(kubernetes.client.ApiException) as info:
        create(api, namespace, obj)
    message, _ = api_error(info.value)
    assert 'unknown field "spec.training.cpu_infer"' in message


@pytest.mark.parametrize(
    ("base", "path", "value", "field"),
    [
        (KIMI_MODEL, "spec.source.huggingFace.revision", "fedcba98", "spec.source.huggingFace.revision"),
        (KIMI_MODEL, "spec.source", {"path": {"path": "/models/kimi"}}, "spec.source"),
        (KIMI_MODEL, "spec.storage", {"hostPath": "/mnt/other"}, "spec.storage"),
        (FINE_TUNE_JOB, "spec.lora", {"rank": 32}, "spec.lora"),
        (FINE_TUNE_JOB, "spec.model", {"name": "other"}, "spec.model"),
        (FINE_TUNE_JOB, "spec.dataset", {"hostPath": {"path": "/data/x.jsonl"}}, "spec.dataset"),
    ],
    ids=["km-revision", "km-source", "km-storage", "ftj-lora", "ftj-model", "ftj-dataset"],
)
def test_immutable_fields_refuse_updates(
    api: kubernetes.client.ApiClient, namespace: str, base: dict[str, Any], path: str, value: Any, field: str
) -> None:
    create(api, namespace, base)
    custom = kubernetes.client.CustomObjectsApi(api)
    plural, name = PLURALS[base["kind"]], base["metadata"]["name"]

    def replace() -> kubernetes.client.ApiException | None:
        # The operator writes the object too (finalizer, status): a conflict is tried again.
        current = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        try:
            custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, vary(current, path, value))
        except kubernetes.client.ApiException as exc:
            return None if exc.status == 409 else exc
        raise AssertionError(f"{path} was changed")

    error = wait_for(replace, 30, f"an answer other than a conflict to a change of {path}")
    assert error.status == 422, error.body
    message, fields = api_error(error)
    assert field in fields or f"{field}:" in message, (field, fields, message)
    assert "is immutable" in message


def test_mutable_fields_accept_updates(api: kubernetes.client.ApiClient, namespace: str) -> None:
    create(api, namespace, FINE_TUNE_JOB)
    custom = kubernetes.client.CustomObjectsApi(api)
    # A merge patch: no resourceVersion to conflict with the operator's own writes.
    changes = {"spec": {"suspend": True, "queueName": "gpu-queue", "output": {"reclaimPolicy": "Delete"}}}
    updated = custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", "tune", changes)
    assert updated["spec"]["suspend"] is True
    assert updated["metadata"]["generation"] == 2

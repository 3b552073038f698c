"""FineTuneJob against the real apiserver: pinning to the KimiModel's node, suspend, Kueue, progress
RBAC, OOM handling and success, with KWOK running the training pods."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import queue
import secrets
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from e2e.conftest import DATASET, OperatorProcess, PrometheusProcess, pod_runner
from e2e.helpers import wait_for
from e2e.manifests import FINE_TUNE_JOB, GROUP, KIMI_MODEL, VERSION
from e2e.test_kimimodel import _token_kubeconfig, condition
from kimi_operator.api.finetunejob import KIND, PLURAL
from kimi_operator.devcluster import build, podprotocol
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.devcluster.runner import default_images
from kimi_operator.render.kimimodel import model_label
from kimi_operator.workloads.report import OwnStatus
from kimi_operator.workloads.train.progress import Reporter

pytestmark = pytest.mark.e2e
HOLD = {"annotations": {"sim.kimi-operator.io/hold": "true"}}
# Small requests keep the simulated node free for the other tests' held pods.
SMALL = {"gpus": 1, "cpu": "4", "memory": "16Gi"}


def custom(api: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api)


def ftj(name: str, **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(FINE_TUNE_JOB)
    obj["metadata"]["name"] = name
    obj["spec"].update(spec)
    return obj


def ready_model(api: kubernetes.client.ApiClient, namespace: str, node: str = "gpu-h200-a") -> None:
    model = copy.deepcopy(KIMI_MODEL)
    model["spec"]["placement"] = {"nodeNames": [node], "count": 1}
    model["spec"]["variants"] = ["bf16"]
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "kimimodels", model)
    wait_for(
        lambda: (
            condition(get(api, namespace, "kimimodels", "kimi"), "Ready") is not None
            and condition(get(api, namespace, "kimimodels", "kimi"), "Ready")["status"] == "True"
        ),
        60,
        "KimiModel Ready",
    )  # type: ignore[index]


def get(api: kubernetes.client.ApiClient, namespace: str, plural: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom(api).get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    return obj


def wait_phase(api: kubernetes.client.ApiClient, namespace: str, name: str, phase: str) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        obj = get(api, namespace, "finetunejobs", name)
        status = last["status"] = obj.get("status") or {}
        current = status.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if current and status.get("phase") == phase else None

    try:
        return wait_for(check, 60, f"{name} phase {phase}")
    except AssertionError as exc:
        batch, core = kubernetes.client.BatchV1Api(api), kubernetes.client.CoreV1Api(api)
        job_status = batch.read_namespaced_job(f"{name}-train", namespace).status
        pods = [
            (p.metadata.name, p.status.phase, [(c.type, c.reason, c.message) for c in p.status.conditions or []])
            for p in core.list_namespaced_pod(namespace, label_selector=f"job-name={name}-train").items
        ]
        on_node = [
            (p.metadata.namespace, p.metadata.name, p.status.phase, p.spec.containers[0].resources.requests)
            for p in core.list_pod_for_all_namespaces(field_selector="spec.nodeName=gpu-h200-a").items
        ]
        raise AssertionError(
            f"{exc}; status: {last.get('status')}; job: {job_status}; pods: {pods}; node: {on_node}"
        ) from None


def training_pod_status(cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str, name: str) -> OwnStatus:
    """What a FineTuneJob's training pod writes its status with: the Job's ServiceAccount token."""
    pod_api = _token_kubeconfig(cluster, api, namespace, f"{name}-train")
    return OwnStatus(pod_api, kind=KIND, plural=PLURAL, namespace=namespace, name=name, manager="kimi-train")


def release_training(api: kubernetes.client.ApiClient, namespace: str, name: str) -> None:
    """Let a held training pod end (KWOK then makes it succeed)."""
    core = kubernetes.client.CoreV1Api(api)
    (pod,) = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}-train").items
    core.patch_namespaced_pod(
        pod.metadata.name, namespace, {"metadata": {"annotations": {"sim.kimi-operator.io/hold": None}}}
    )


def job(api: kubernetes.client.ApiClient, namespace: str, name: str) -> Any:
    return kubernetes.client.BatchV1Api(api).read_namespaced_job(f"{name}-train", namespace)


def test_waits_for_its_model(api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess) -> None:
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("early", resources=SMALL)
    )
    obj = wait_for(
        lambda: (
            (c := condition(get(api, namespace, "finetunejobs", "early"), "Reconciling"))
            and c["reason"] == "WaitingForModel"
            and c
        ),
        60,
        "WaitingForModel",
    )
    assert "KimiModel kimi does not exist" in obj["message"]


def test_job_is_pinned_to_the_models_node_with_the_rendered_pod(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    spec = {
        "podMetadata": HOLD,
        "queueName": "gpu-queue",
        "resources": {"gpus": 2, "cpu": "8", "memory": "512Gi", "sharedMemory": "32Gi"},
    }
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", ftj("tune", **spec))
    obj = wait_phase(api, namespace, "tune", "Running")
    assert obj["status"]["node"] == "gpu-h200-a"
    assert condition(obj, "Reconciling")["reason"] == "Training"  # type: ignore[index]
    assert condition(obj, "Reconciling")["message"] == "attempt 1 running on gpu-h200-a"  # type: ignore[index]
    train = job(api, namespace, "tune")
    assert train.metadata.labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    pod = train.spec.template.spec
    (term,) = pod.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
    assert {(e.key, tuple(e.values)) for e in term.match_expressions} == {
        (model_label(namespace, "kimi"), ("ready",)),
        ("kubernetes.io/hostname", ("gpu-h200-a",)),
    }
    (container,) = pod.containers
    assert container.resources.limits == {"nvidia.com/gpu": "2", "cpu": "8", "memory": "512Gi"}
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["dshm"].empty_dir.medium == "Memory"
    assert volumes["dshm"].empty_dir.size_limit == "32Gi"
    assert volumes["models"].host_path.path == "/mnt/nvme/kimi"
    assert volumes["dataset"].config_map.name == "data"
    assert f"--output-dir=/models/{namespace}/kimi/finetune/tune" in container.args
    config = kubernetes.client.CoreV1Api(api).read_namespaced_config_map("tune-train", namespace)
    assert '"lora_rank": 16' in config.data["train.yaml"]
    assert '"template": "kimi_k25"' in config.data["train.yaml"]
    assert '"formatting": "sharegpt"' in config.data["dataset_info.json"]
    assert train.spec.pod_failure_policy.rules[0].on_exit_codes.values == [20, 21, 22, 23]


def test_suspended_job_starts_when_unsuspended(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("later", suspend=True, podMetadata=HOLD, resources=SMALL)
    )
    obj = wait_phase(api, namespace, "later", "Suspended")
    assert condition(obj, "Ready")["reason"] == "Suspended"  # type: ignore[index]
    assert job(api, namespace, "later").spec.suspend is True
    assert (
        not kubernetes.client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=later-train").items
    )
    custom(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", "later", {"spec": {"suspend": False}}
    )
    wait_phase(api, namespace, "later", "Running")
    assert job(api, namespace, "later").spec.suspend is False


def test_training_pod_writes_its_own_status_only_and_success_needs_the_adapter(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, cluster: Cluster
) -> None:
    ready_model(api, namespace)
    for name in ("mine", "theirs"):
        custom(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "finetunejobs", ftj(name, podMetadata=HOLD, resources=SMALL)
        )
    wait_phase(api, namespace, "mine", "Running")
    pod_api = _token_kubeconfig(cluster, api, namespace, "mine-train")
    progress = {"step": 12, "totalSteps": 48, "percent": 25.0, "loss": 1.25, "tokensPerSecond": 41.5, "eta": "0:12:00"}
    own = OwnStatus(
        pod_api, kind="FineTuneJob", plural="finetunejobs", namespace=namespace, name="mine", manager="kimi-train"
    )
    own.apply({"progress": progress, "latestCheckpoint": f"/models/{namespace}/kimi/finetune/mine/checkpoint-12"})
    table = cluster.kubectl("get", "ftj", "mine", "-n", namespace)
    assert "Running" in table
    assert "25" in table
    assert "1.25" in table
    with pytest.raises(kubernetes.client.ApiException) as info:
        OwnStatus(
            pod_api, kind="FineTuneJob", plural="finetunejobs", namespace=namespace, name="theirs", manager="x"
        ).apply({"progress": progress})
    assert info.value.status == 403
    adapter = {
        "name": "mine",
        "node": "gpu-h200-a",
        "path": f"/models/{namespace}/kimi/finetune/mine/adapter-sglang",
        "sizeBytes": 123456,
        "sha256": "0" * 64,
        "baseModel": "kimi",
        "rank": 16,
        "expertLora": True,
    }
    own.apply({"progress": progress, "adapter": adapter})
    (pod,) = kubernetes.client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=mine-train").items
    kubernetes.client.CoreV1Api(api).patch_namespaced_pod(
        pod.metadata.name, namespace, {"metadata": {"annotations": {"sim.kimi-operator.io/hold": None}}}
    )
    obj = wait_phase(api, namespace, "mine", "Succeeded")
    assert condition(obj, "Ready")["status"] == "True"  # type: ignore[index]
    assert condition(obj, "Ready")["reason"] == "Succeeded"  # type: ignore[index]
    assert obj["status"]["adapter"] == adapter
    assert obj["status"]["progress"]["step"] == 12
    assert obj["status"]["attempts"] == 1


@contextmanager
def kubectl_watch(cluster: Cluster, *args: str) -> Iterator[queue.Queue[str]]:
    """``kubectl ... -w`` running; its output lines arrive on the queue as kubectl prints them."""
    cache = str(cluster.layout.root / "kubectl-cache")
    kubeconfig = str(cluster.layout.kubeconfig)
    command = [str(build.binary("kubectl")), "--kubeconfig", kubeconfig, "--cache-dir", cache, *args, "-w"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=10)


def rows_until(lines: queue.Queue[str], *words: str) -> list[str]:
    """Every line kubectl printed up to and including the first that holds every word."""
    seen: list[str] = []
    while not seen or not all(word in seen[-1].split() for word in words):
        try:
            seen.append(lines.get(timeout=30))
        except queue.Empty:
            raise AssertionError(f"kubectl printed no line with {words}; it printed {seen}") from None
    return seen


def next_line_with(lines: queue.Queue[str], *words: str) -> str:
    """The next line printed that holds every word (kubectl may print a row more than once)."""
    return rows_until(lines, *words)[-1]


def test_kubectl_watch_shows_progress_moving(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, cluster: Cluster, tmp_path: Path
) -> None:
    """The training pod's reporter, with the Job's own token, turns a growing trainer log into rows of
    ``kubectl get ftj -w``: step by step, percent and loss change as the user watches."""
    ready_model(api, namespace)
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("watched", podMetadata=HOLD, resources=SMALL)
    )
    wait_phase(api, namespace, "watched", "Running")
    own = training_pod_status(cluster, api, namespace, "watched")
    reporter = Reporter(tmp_path, own)
    log = tmp_path / "trainer_log.jsonl"
    with kubectl_watch(cluster, "get", "ftj", "watched", "-n", namespace, "-o", "wide", "--no-headers") as lines:
        next_line_with(lines, "watched", "Running")
        for step, loss in ((1, 2.5), (2, 1.75), (3, 1.25), (4, 0.5)):
            record = {
                "current_steps": step,
                "total_steps": 4,
                "loss": loss,
                "lr": 2e-5,
                "epoch": step / 4,
                "percentage": step * 25.0,
                "elapsed_time": f"0:00:{10 * step:02d}",
                "remaining_time": f"0:00:{10 * (4 - step):02d}",
                "total_tokens": 2000 * step,
            }
            with log.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            assert reporter.poll() is not None
            # Phase, percent, loss, step and tokens/s as the user sees them, row after row.
            next_line_with(lines, "Running", f"{step * 25.0:g}", f"{loss:g}", str(step), "200")


def test_training_progress_reaches_prometheus(
    api: kubernetes.client.ApiClient, namespace: str, prometheus: PrometheusProcess, cluster: Cluster
) -> None:
    """What the training pod reports is in Prometheus within a scrape, for dashboards and alerts."""
    ready_model(api, namespace)
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("graphed", podMetadata=HOLD, resources=SMALL)
    )
    wait_phase(api, namespace, "graphed", "Running")
    own = training_pod_status(cluster, api, namespace, "graphed")
    selector = f'{{namespace="{namespace}",name="graphed"}}'
    for step, loss in ((10, 2.5), (20, 1.5)):
        progress = {"step": step, "totalSteps": 40, "percent": step * 2.5, "loss": loss, "tokensPerSecond": 300.0}
        own.apply({"progress": {**progress, "eta": "0:05:00"}})
        query = f"kimi_operator_finetune_step{selector}"
        wait_for(lambda q=query, s=step: prometheus.value(q) == s, 30, f"step {step} in Prometheus")
        assert prometheus.value(f"kimi_operator_finetune_loss{selector}") == loss
    assert prometheus.value(f"kimi_operator_finetune_tokens_per_second{selector}") == 300.0
    assert prometheus.value(f"kimi_operator_finetune_eta_seconds{selector}") == 300.0
    assert prometheus.value(f"kimi_operator_finetune_progress_percent{selector}") == 50.0


TINY = Path(__file__).parents[1] / "tests" / "oracle" / "tiny_deepseek.py"
# The pods the local pod runner runs for real (a Job's pod also held Running by KWOK meanwhile).
RUN = {"annotations": {podprotocol.RUN_ANNOTATION: "true", podprotocol.HOLD_ANNOTATION: "true"}}
EPOCHS = 8


def llamacpp_build() -> Path:
    """`make llamacpp`'s build (KIMI_LLAMACPP): the e2e tests fail without it, never skip."""
    found = os.environ.get("KIMI_LLAMACPP")
    if not found or not (Path(found) / "src" / "convert_lora_to_gguf.py").exists():
        pytest.fail("KIMI_LLAMACPP is not set to a llama.cpp build: run the tests with `make e2e`")
    return Path(found)


@pytest.mark.timeout(900)
def test_a_real_training_run_reports_through_the_api(
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    cluster: Cluster,
    train_python: str,
) -> None:
    """The training Job's pod, run for real by the local pod runner on this machine's CPU with the
    Job's own ServiceAccount token: LLaMA-Factory trains on the operator's rendered configuration,
    ``kubectl get ftj -w`` shows the steps go by, and the exported adapter lands in status."""
    images = default_images(repo_root(), train_python=train_python, llamacpp=llamacpp_build())
    with pod_runner(cluster, api, images) as runner:
        ready_model(api, namespace)  # its prepare pod simulated: the weights are put on the node here
        storage = runner.config.node_dir("gpu-h200-a") / KIMI_MODEL["spec"]["storage"]["hostPath"].lstrip("/")
        model_dir = storage / namespace / "kimi"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        records = model_dir / "records.jsonl"
        for script in ([str(TINY), str(model_dir / "bf16"), "tiny"], [str(TINY), "dataset", str(records), "48"]):
            subprocess.run([train_python, *script], check=True, capture_output=True, env=env, timeout=600)
        # In the public guide's shape ({"conversations": ...}, no messagesKey in the spec): the key is
        # detected and LLaMA-Factory itself trains on what the pod makes of it.
        guide = [
            json.dumps({"conversations": json.loads(line)["messages"]}) for line in records.read_text().splitlines()
        ]
        kubernetes.client.CoreV1Api(api).replace_namespaced_config_map(
            "data", namespace, {"metadata": {"name": "data"}, "data": {"train.jsonl": "\n".join(guide) + "\n"}}
        )
        spec = {"podMetadata": RUN, "resources": SMALL, "lora": {"rank": 8, "alpha": 16, "dropout": 0.05}}
        # 12 steps an epoch: long enough for the pod's reports (every second on this cluster) to show several.
        spec["training"] = {
            "epochs": EPOCHS,
            "learningRate": 1e-3,
            "perDeviceBatchSize": 4,
            "gradientAccumulationSteps": 1,
            "cutoffLen": 256,
            "loggingSteps": 1,
            "saveSteps": 96,
        }
        with kubectl_watch(cluster, "get", "ftj", "real", "-n", namespace, "-o", "wide", "--no-headers") as lines:
            custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", ftj("real", **spec))
            rows = rows_until(lines, "real", "Succeeded")
        done = wait_phase(api, namespace, "real", "Succeeded")
    steps = 12 * EPOCHS
    # Columns of -o wide: name, phase, progress, loss, step, tokens/s, ETA, model, age.
    watched = [int(row.split()[4]) for row in rows if len(row.split()) == 9 and row.split()[4].isdigit()]
    # The user saw the run move: several steps, in order, up to the last.
    assert len(set(watched)) >= 3, rows
    assert watched == sorted(watched)
    assert watched[-1] == steps
    status = done["status"]
    assert status["progress"]["step"] == steps
    assert status["progress"]["tokensPerSecond"] > 0
    assert status["latestCheckpoint"].endswith(f"/checkpoint-{steps}")
    adapter = status["adapter"]
    out = model_dir / "finetune" / "real" / "adapter"
    assert adapter["sha256"] == hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    # Converted for llama.cpp at export, without the MLA projections LLaMA-Factory's "all" trained.
    assert adapter["ggufSha256"] == hashlib.sha256((out / "adapter.gguf").read_bytes()).hexdigest()
    assert adapter["llamacppDroppedModules"] == ["kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj", "q_b_proj"]
    assert (adapter["name"], adapter["node"], adapter["rank"], adapter["expertLora"]) == (
        "real",
        "gpu-h200-a",
        8,
        False,
    )
    assert condition(done, "Ready")["status"] == "True"  # type: ignore[index]


def test_oom_kill_says_what_to_lower_and_was_retried(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    oom = {
        "labels": {"sim.kimi-operator.io/fail": "true"},
        "annotations": {"sim.kimi-operator.io/exit-code": "137", "sim.kimi-operator.io/reason": "OOMKilled"},
    }
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("big", podMetadata=oom, backoffLimit=1, resources=SMALL)
    )
    obj = wait_phase(api, namespace, "big", "Failed")
    stalled = condition(obj, "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "OOMKilled"
    assert "lower spec.training.cutoffLen (4096) or spec.training.perDeviceBatchSize (1)" in stalled["message"]
    assert obj["status"]["attempts"] == 2  # the first OOM kill was retried
    pods = kubernetes.client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=big-train").items
    assert len(pods) == 2
    # Every attempt trains into the same output directory, where the retry finds the checkpoints.
    assert len({tuple(p.spec.containers[0].args) for p in pods}) == 1


def test_bad_dataset_stalls_without_retry(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    bad = {
        "labels": {"sim.kimi-operator.io/fail": "true"},
        "annotations": {
            "sim.kimi-operator.io/exit-code": "20",
            "sim.kimi-operator.io/message": "line 7: messages: must end with an assistant turn, ends with user",
        },
    }
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("data", podMetadata=bad, resources=SMALL)
    )
    obj = wait_phase(api, namespace, "data", "Failed")
    stalled = condition(obj, "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "InvalidDataset"
    assert stalled["message"] == "line 7: messages: must end with an assistant turn, ends with user"
    assert obj["status"]["attempts"] == 1


def test_deletion_keeps_outputs_unless_asked_then_cleans_them_on_the_node(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    for name, policy in (("keep", "Retain"), ("drop", "Delete")):
        obj = ftj(name, resources=SMALL, output={"reclaimPolicy": policy})
        custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", obj)
        wait_phase(api, namespace, name, "Failed")  # simulated pods export nothing: AdapterMissing
        custom(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", name)
    wait_for(
        lambda: not custom(api).list_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs")["items"],
        60,
        "FineTuneJobs gone",
    )
    batch = kubernetes.client.BatchV1Api(api)
    cleanups = batch.list_namespaced_job(namespace, label_selector="app.kubernetes.io/component=cleanup").items
    assert [j.metadata.labels["kimi-operator.io/finetunejob"] for j in cleanups] == ["drop"]
    (cleanup,) = cleanups
    assert cleanup.status.succeeded == 1
    assert cleanup.spec.template.spec.containers[0].args == [
        "remove-model",
        f"--root=/models/{namespace}/kimi/finetune/drop",
    ]
    terms = cleanup.spec.template.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    assert terms.node_selector_terms[0].match_expressions[0].values == ["gpu-h200-a"]


def test_deleting_the_namespace_of_a_running_training_releases_everything(
    api: kubernetes.client.ApiClient, operator: OperatorProcess
) -> None:
    """The running training pod ends as a kubelet would end it (SIGTERM, Failed), the job controller
    releases it, the operator's finalizer lets the FineTuneJob go, and the namespace is deleted."""
    core = kubernetes.client.CoreV1Api(api)
    namespace = f"t-deleted-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": namespace, "labels": {"kimi-operator.io/e2e": "true"}}})
    wait_for(lambda: bool(core.list_namespaced_service_account(namespace).items), 30, "default ServiceAccount")
    ready_model(api, namespace, node="gpu-4090-b")
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "data"}, "data": {"train.jsonl": DATASET}})
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("doomed", podMetadata=HOLD, resources=SMALL)
    )
    wait_phase(api, namespace, "doomed", "Running")
    core.delete_namespace(namespace)

    def namespace_gone() -> bool:
        try:
            core.read_namespace(namespace)
        except kubernetes.client.ApiException as exc:
            return exc.status == 404
        return False

    wait_for(namespace_gone, 120, f"namespace {namespace} deleted")

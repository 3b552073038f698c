import json
from typing import Any

import pytest

from kimi_operator.api.finetunejob import FineTuneJobSpec
from kimi_operator.render import finetunejob as render
from kimi_operator.render import llamafactory

OWNER = render.owner("ml", "tune", "uid-2")


def spec(**overrides: Any) -> FineTuneJobSpec:
    base: dict[str, Any] = {"model": {"name": "kimi"}, "dataset": {"configMap": {"name": "data", "key": "train.jsonl"}}}
    return FineTuneJobSpec.model_validate({**base, **overrides})


def test_train_args_follow_the_spec_and_the_guide_defaults() -> None:
    args = llamafactory.train_args(spec(), model_path="/m/bf16", dataset_dir="/etc/kimi-train", output_dir="/o")
    assert (args["lora_rank"], args["lora_alpha"], args["lora_dropout"]) == (16, 32, 0.1)
    assert args["learning_rate"] == 2e-5
    assert args["num_train_epochs"] == 3.0
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (1, 16)
    assert args["template"] == "kimi_k25"
    assert args["enable_thinking"] is False
    assert args["overwrite_output_dir"] is False
    assert args["use_kt"] is True
    assert args["kt_use_lora_experts"] is False
    assert args["use_reentrant_gc"] is False
    # The stale keys of the public guide are never rendered.
    assert not {"kt_optimize_rule", "cpu_infer", "chunk_size"} & args.keys()


def test_thinking_and_expert_lora_switches() -> None:
    s = spec(training={"thinking": True}, lora={"experts": True, "targetModules": ["q_a_proj", "o_proj"]})
    args = llamafactory.train_args(s, model_path="/m", dataset_dir="/d", output_dir="/o")
    assert args["enable_thinking"] is True
    # Expert LoRA is trained by kt-kernel whenever use_kt is on; the switch chooses what is exported,
    # and never turns on kt-kernel's separate GPU-side "LoRA Experts".
    assert args["kt_use_lora_experts"] is False
    assert args["lora_target"] == "q_a_proj,o_proj"
    # Real tokens are counted, so the trainer log carries throughput for status.progress.
    assert args["include_num_input_tokens_seen"] == "non_padding"
    container = render.train_job(OWNER, s, "n1", storage_path="/mnt/nvme/kimi", image="t:1")["spec"]["template"][
        "spec"
    ]["containers"][0]
    assert "--lora-experts" in container["args"]
    plain = render.train_job(OWNER, spec(), "n1", storage_path="/mnt/nvme/kimi", image="t:1")["spec"]["template"][
        "spec"
    ]["containers"][0]
    assert "--lora-experts" not in plain["args"]
    threads = {"name": "ACCELERATE_KT_NUM_THREADS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}
    assert threads in plain["env"]


def test_dataset_registration_maps_openai_messages() -> None:
    info = llamafactory.dataset_info(file_name="/d/x.jsonl")
    entry = info["kimi_sft"]
    assert entry["file_name"] == "/d/x.jsonl"
    assert entry["formatting"] == "sharegpt"
    # The training pod writes the records under `messages`, whatever key the source file uses.
    assert entry["columns"] == {"messages": "messages", "images": "images"}
    assert entry["tags"]["role_tag"] == "role"
    assert entry["tags"]["assistant_tag"] == "assistant"


# (case id, spec.dataset.messagesKey, the pod's --messages-key argument; None: none, it detects the key).
MESSAGES_KEYS = [
    ("unset-detects", None, None),
    ("messages", "messages", "messages"),
    ("guide", "conversations", "conversations"),
]


@pytest.mark.parametrize(("key", "arg"), [m[1:] for m in MESSAGES_KEYS], ids=[m[0] for m in MESSAGES_KEYS])
def test_messages_key_reaches_the_pod_only_when_set(key: str | None, arg: str | None) -> None:
    data: dict[str, Any] = {"hostPath": {"path": "/d/x.jsonl"}}
    if key is not None:
        data["messagesKey"] = key
    s = spec(dataset=data)
    args = render.train_job(OWNER, s, "n1", storage_path="/s", image="t")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    given = [a.removeprefix("--messages-key=") for a in args if a.startswith("--messages-key")]
    assert given == ([] if arg is None else [arg])
    files = llamafactory.config_files(
        s, model_path="/m", dataset_file="/o/dataset.jsonl", output_dir="/o", config_dir="/c"
    )
    registration = json.loads(files["dataset_info.json"])["kimi_sft"]
    assert registration["columns"] == {"messages": "messages", "images": "images"}


def test_job_is_pinned_suspendable_and_queued() -> None:
    job = render.train_job(OWNER, spec(suspend=True, queueName="gpu"), "n1", storage_path="/mnt/nvme/kimi", image="t:1")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    terms = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    expressions = terms["nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "kimi-operator.io/model.ml.kimi", "operator": "In", "values": ["ready"]} in expressions
    assert {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]} in expressions
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2", "cpu": "64", "memory": "900Gi"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["hostPath"]["path"] == "/mnt/nvme/kimi"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes["dataset"] == {"name": "dataset", "configMap": {"name": "data"}}
    assert "--dataset=/data/train.jsonl" in pod["containers"][0]["args"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [20, 21, 22, 23]}}
    assert rules[1]["action"] == "Ignore"


def test_no_queue_label_without_a_queue() -> None:
    job = render.train_job(OWNER, spec(), "n1", storage_path="/s", image="t:1")
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert job["spec"]["suspend"] is False


def test_dataset_on_a_claim_or_the_node() -> None:
    claim = render.train_job(
        OWNER,
        spec(dataset={"persistentVolumeClaim": {"claimName": "c", "path": "sets/a.jsonl"}}),
        "n1",
        storage_path="/s",
        image="t",
    )
    volumes = {v["name"]: v for v in claim["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dataset"]["persistentVolumeClaim"] == {"claimName": "c", "readOnly": True}
    assert "--dataset=/data/sets/a.jsonl" in claim["spec"]["template"]["spec"]["containers"][0]["args"]
    host = render.train_job(
        OWNER, spec(dataset={"hostPath": {"path": "/srv/data/a.jsonl"}}), "n1", storage_path="/s", image="t"
    )
    volumes = {v["name"]: v for v in host["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dataset"]["hostPath"] == {"path": "/srv/data", "type": "Directory"}


def test_training_rbac_is_limited_to_this_objects_status() -> None:
    _, role, _ = render.rbac(OWNER)
    assert role["rules"] == [
        {
            "apiGroups": ["kimi-operator.io"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["tune"],
            "verbs": ["get", "patch"],
        }
    ]


def test_a_hub_dataset_is_fetched_by_the_pod_with_the_token_from_a_secret() -> None:
    hub = {"repo": "acme/chats", "revision": "abc", "path": "train.jsonl", "tokenSecretRef": {"name": "hf", "key": "t"}}
    job = render.train_job(OWNER, spec(dataset={"huggingFace": hub}), "n1", storage_path="/s", image="t")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "--dataset-repo=acme/chats" in container["args"]
    assert "--dataset-revision=abc" in container["args"]
    assert "--dataset-file=train.jsonl" in container["args"]
    assert not [a for a in container["args"] if a.startswith("--dataset=")]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}} in container["env"]
    assert "dataset" not in {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]}


QUEUE = render.KUEUE_QUEUE_LABEL


def live_job(suspend: bool = False, queue: str | None = None) -> dict[str, Any]:
    job = render.train_job(OWNER, spec(suspend=suspend, queueName=queue), "n1", storage_path="/s", image="i")
    return job


@pytest.mark.parametrize(
    ("live", "desired", "patch"),
    [
        (live_job(), live_job(), None),
        (live_job(queue="q"), live_job(queue="q"), None),
        (live_job(), live_job(suspend=True), {"spec": {"suspend": True}}),
        (live_job(suspend=True), live_job(), {"spec": {"suspend": False}}),
        (live_job(), live_job(queue="q"), {"metadata": {"labels": {QUEUE: "q"}}}),
        # A label the merge patch must remove is sent as null.
        (live_job(queue="q"), live_job(), {"metadata": {"labels": {QUEUE: None}}}),
        # Queued: Kueue owns suspend (its webhook suspended the Job): only the label is ours.
        (live_job(queue="a"), live_job(suspend=True, queue="b"), {"metadata": {"labels": {QUEUE: "b"}}}),
        (live_job(suspend=True, queue="q"), live_job(queue="q"), None),
        (live_job(queue="q"), live_job(suspend=True, queue="q"), None),
    ],
    ids=[
        "same",
        "same-queue",
        "suspend",
        "resume",
        "queue-added",
        "queue-removed",
        "queue-changed",
        "kueue-suspended",
        "kueue-admitted",
    ],
)
def test_a_live_job_gets_only_the_changes_it_accepts(
    live: dict[str, Any], desired: dict[str, Any], patch: dict[str, Any] | None
) -> None:
    assert render.job_update(live, desired) == patch


def test_a_job_rendered_differently_is_left_alone() -> None:
    # An operator upgrade (or a node change) renders another template: nothing of it is patched.
    live = live_job()
    desired = render.train_job(
        OWNER,
        spec(podMetadata={"labels": {"team": "legal"}}, backoffLimit=9),
        "n2",
        storage_path="/elsewhere",
        image="new",
    )
    assert render.job_update(live, desired) is None


@pytest.mark.parametrize(("gpus", "processes"), [(2, 2), (8, 8), (1, None)])
def test_one_training_process_per_gpu(gpus: int, processes: int | None) -> None:
    """One process may not drive several GPUs (LLaMA-Factory refuses it, and with KTransformers the
    model would go into DataParallel): a pod with several runs one process each under FSDP2."""
    s = spec(resources={"gpus": gpus})
    args = render.train_job(OWNER, s, "n1", storage_path="/mnt/nvme/kimi", image="t:1")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    files = llamafactory.config_files(s, model_path="/m", dataset_file="/o/d.jsonl", output_dir="/o", config_dir="/c")
    if processes is None:
        assert not [a for a in args if a.startswith("--processes")]
        assert "accelerate.yaml" not in files
        return
    assert f"--processes={processes}" in args
    config = json.loads(files["accelerate.yaml"])
    assert config["num_processes"] == processes
    assert (config["distributed_type"], config["fsdp_config"]["fsdp_version"]) == ("FSDP", 2)
    assert config["mixed_precision"] == "bf16"
    # KTransformers' settings stay in the training arguments: accelerate-kt refuses them here.
    assert "kt_config" not in config


def test_the_pod_is_told_its_paths_in_arguments_the_same_as_its_configuration() -> None:
    """The model and output directories reach the pod as arguments (a pod runner that cannot mount
    rewrites arguments, never configuration files), with the values the configuration holds."""
    job = render.train_job(OWNER, spec(), "n1", storage_path="/mnt/nvme/kimi", image="t:1")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    files = llamafactory.config_files(
        spec(),
        model_path=render.base_model_dir("ml", "kimi"),
        dataset_file="unused",
        output_dir=render.output_dir("ml", "kimi", "tune"),
        config_dir=render.CONFIG_MOUNT,
    )
    config = json.loads(files["train.yaml"])
    assert f"--model-dir={config['model_name_or_path']}" in args
    assert f"--output-dir={config['output_dir']}" in args
    assert render.adapter_dir("ml", "kimi", "tune") == f"{config['output_dir']}/adapter"

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kimi_operator.api.durations import seconds
from kimi_operator.api.exitcodes import TrainExit
from kimi_operator.devcluster.hub import FakeHub
from kimi_operator.workloads.train import command as train
from kimi_operator.workloads.train import trainer
from kimi_operator.workloads.train.command import to_llamafactory
from kimi_operator.workloads.train.progress import (
    LogTail,
    Reporter,
    latest_checkpoint,
    progress_from_log,
    tokens_per_second,
)


def test_records_become_text_with_image_placeholders(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    parts = [
        {"type": "text", "text": "What is "},
        {"type": "image_url", "image_url": {"url": "file://img/a.png"}},
        {"type": "text", "text": "?"},
    ]
    src.write_text(
        json.dumps({"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "A cat."}]})
        + "\n\n"
    )
    assert to_llamafactory(src, "messages", tmp_path, tmp_path / "out.jsonl") == 1
    (record,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert record["messages"][0] == {"role": "user", "content": "What is <image>?"}
    assert record["images"] == [str(tmp_path / "img" / "a.png")]
    assert not (tmp_path / "out.jsonl.partial").exists()


@pytest.mark.parametrize(
    ("key", "prefix"),
    [("messages", b""), ("conversations", b""), ("conversations", b"\xef\xbb\xbf")],
    ids=["messages", "conversations", "conversations-with-byte-order-mark"],
)
def test_records_are_written_under_messages_whatever_their_key(tmp_path: Path, key: str, prefix: bytes) -> None:
    # The registration names the `messages` column, whichever key the source file uses.
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    (tmp_path / "in.jsonl").write_bytes(prefix + (json.dumps({key: turns}) + "\n").encode() * 2)
    assert to_llamafactory(tmp_path / "in.jsonl", key, tmp_path, tmp_path / "out.jsonl") == 2
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert records == [{"messages": turns, "images": []}] * 2


def test_latest_complete_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for step, complete in ((3, True), (12, True), (15, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-12"


def test_trainer_log_lines_become_progress(tmp_path: Path) -> None:
    log = tmp_path / "trainer_log.jsonl"
    line = {
        "current_steps": 12,
        "total_steps": 48,
        "loss": 1.25,
        "lr": 2e-5,
        "epoch": 0.75,
        "percentage": 25.0,
        "elapsed_time": "0:04:00",
        "remaining_time": "0:12:00",
        "throughput": 41.5,
    }
    log.write_text(json.dumps(line) + "\n" + '{"current_steps": 13')  # the second line is still being written
    tail = LogTail(log)
    (record,) = list(tail.records())
    assert progress_from_log(record, now="t") == {
        "step": 12,
        "totalSteps": 48,
        "percent": 25.0,
        "loss": 1.25,
        "learningRate": 2e-5,
        "epoch": 0.75,
        "tokensPerSecond": 41.5,
        "eta": "0:12:00",
        "lastUpdateTime": "t",
    }
    with log.open("a") as fh:
        fh.write(', "total_steps": 48}\n')
    assert [r["current_steps"] for r in tail.records()] == [13]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:00:00", 0),
        ("0:04:05", 245),
        ("12:00:01", 43201),
        ("1 day, 2:00:00", 93600),
        ("3 days, 0:00:10", 259210),
        ("", None),
        ("4:05", None),
        ("x:00:00", None),
        ("many days, 1:00:00", None),
    ],
)
def test_durations_in_the_trainer_log(text: str, expected: int | None) -> None:
    assert seconds(text) == expected


def test_tokens_per_second_leaves_out_the_tokens_of_a_resumed_run() -> None:
    record = {"total_tokens": 12_000, "elapsed_time": "0:01:40", "throughput": 120.0}
    assert tokens_per_second(record, 0) == 120.0
    # 10 000 of those tokens were trained by the pod whose checkpoint this one resumed.
    assert tokens_per_second(record, 10_000) == 20.0
    # Too early to divide: LLaMA-Factory's own figure, unless it counts another pod's tokens.
    early = {"total_tokens": 300, "elapsed_time": "0:00:00", "throughput": 410.5}
    assert tokens_per_second(early, 0) == 410.5
    assert tokens_per_second(early, 100) is None
    assert tokens_per_second({"current_steps": 3}, 0) is None


def test_reporter_after_a_resume(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2, "num_input_tokens_seen": 800}))
    earlier = {"current_steps": 2, "total_steps": 4, "loss": 2.5, "total_tokens": 800, "elapsed_time": "0:00:08"}
    log = tmp_path / "trainer_log.jsonl"
    log.write_text(json.dumps(earlier) + "\n")
    reporter = Reporter(tmp_path, None, resumed_from=checkpoint)
    first = reporter.poll()
    assert first is not None
    # The earlier pod's step and loss are shown at once, its rate is not.
    assert first["progress"]["step"] == 2
    assert "tokensPerSecond" not in first["progress"]
    assert first["latestCheckpoint"] == str(checkpoint)
    now = {"current_steps": 3, "total_steps": 4, "loss": 2.0, "total_tokens": 1200, "elapsed_time": "0:00:04"}
    with log.open("a") as fh:
        fh.write(json.dumps(now) + "\n")
    second = reporter.poll()
    assert second is not None
    assert second["progress"]["step"] == 3
    assert second["progress"]["tokensPerSecond"] == 100.0


def fake_llamafactory(monkeypatch: pytest.MonkeyPatch, run_exp: Callable[[dict[str, Any]], None]) -> None:
    """LLaMA-Factory's entry point, replaced: what reaches it is the test's to see."""
    monkeypatch.setattr(trainer, "register_template", lambda: None)
    for name in ("llamafactory", "llamafactory.train", "llamafactory.train.tuner"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules["llamafactory.train.tuner"], "run_exp", run_exp, raising=False)


def test_the_pod_trains_on_the_guides_conversations_file_without_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    turns = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"conversations": turns}) + "\n")
    out = tmp_path / "out"
    seen: list[list[dict[str, Any]]] = []

    def run_exp(args: dict[str, Any]) -> None:
        seen.extend(json.loads(line) for line in (out / "dataset.jsonl").read_text().splitlines())
        raise ValueError("stop here")  # LLaMA-Factory refusing the configuration

    fake_llamafactory(monkeypatch, run_exp)
    code = train.main([f"--config-dir={tmp_path / 'config'}", f"--dataset={data}", f"--output-dir={out}"])
    assert code == TrainExit.INVALID_CONFIG  # past the dataset: it reached the trainer
    assert seen == [{"messages": turns, "images": []}]
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"event": "dataset", "records": 1, "key": "conversations"} in events


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (b"", [], "no records: the dataset is empty"),
        (b"\n", [], "no records: the dataset is empty"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', [], "line 1: not valid UTF-8: byte 0xe9"),
        (
            b'{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
            ["--messages-key=messages"],
            "line 1: no 'messages' key (found 'conversations': set spec.dataset.messagesKey)",
        ),
    ],
    ids=["empty", "only-a-newline", "not-utf-8", "key-given-other-than-the-records"],
)
def test_a_bad_dataset_fails_the_pod_before_training(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    args: list[str],
    message: str,
) -> None:
    def run_exp(args: dict[str, Any]) -> None:
        raise AssertionError("trained on a bad dataset")

    fake_llamafactory(monkeypatch, run_exp)
    data, out = tmp_path / "train.jsonl", tmp_path / "o"
    data.write_bytes(content)
    code = train.main([f"--config-dir={tmp_path / 'config'}", f"--dataset={data}", f"--output-dir={out}", *args])
    assert code == TrainExit.INVALID_DATASET
    error = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert error["reason"] == "InvalidDataset"
    assert message in error["message"]
    assert not out.exists()


def test_a_bad_dataset_on_the_hub_fails_before_training(
    isolated_hub_client: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    with FakeHub(token="hf_data_token") as server:
        server.add_commit("acme/support-chats", {"data/train.jsonl": bad.encode(), "README.md": b"# data\n"})
        monkeypatch.setenv("HF_TOKEN", "hf_data_token")
        code = train.main(
            [
                "--config-dir=/nonexistent",
                "--dataset-repo=acme/support-chats",
                "--dataset-revision=main",
                "--dataset-file=data/train.jsonl",
                f"--endpoint={server.endpoint}",
                f"--output-dir={tmp_path / 'out'}",
            ]
        )
    assert code == TrainExit.INVALID_DATASET
    error = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert "line 1: messages: must end with an assistant turn" in error["message"]
    assert (tmp_path / "out" / "source" / "data" / "train.jsonl").read_text() == bad


def test_a_missing_file_in_the_hub_dataset_is_named(
    isolated_hub_client: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeHub() as server:
        sha = server.add_commit("acme/chats", {"README.md": b"# data\n"})
        code = train.main(
            [
                "--config-dir=/nonexistent",
                "--dataset-repo=acme/chats",
                f"--dataset-revision={sha}",
                "--dataset-file=train.jsonl",
                f"--endpoint={server.endpoint}",
                f"--output-dir={tmp_path / 'out'}",
            ]
        )
    assert code == TrainExit.INVALID_DATASET
    assert f"acme/chats@{sha} has no file train.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("writable", [True, False], ids=["published", "volume-fails"])
def test_the_pod_publishes_its_adapter_to_the_shared_volume_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], writable: bool
) -> None:
    from tests.test_adapter import peft_output  # noqa: PLC0415 (the adapter LLaMA-Factory leaves)

    turns = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": turns}) + "\n")
    out, store = tmp_path / "out", tmp_path / "store"
    if writable:
        store.mkdir()
    else:
        store.write_text("not a directory")  # the volume is not what it should be
    fake_llamafactory(monkeypatch, lambda args: peft_output(out))
    code = train.main(
        [
            f"--config-dir={tmp_path / 'config'}",
            f"--dataset={data}",
            f"--output-dir={out}",
            "--adapter-name=support",
            f"--publish-dir={store}",
            "--publish-claim=adapters",
            "--publish-namespace=ml",
        ]
    )
    # A volume that fails costs the copy, not the run.
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (reported,) = [e for e in events if e["event"] == "adapter"]
    if writable:
        assert reported["published"] == {"claimName": "adapters", "path": f"ml/support/{reported['sha256']}"}
        assert (store / reported["published"]["path"] / "adapter_model.safetensors").is_file()
        assert "publishError" not in reported
    else:
        assert "published" not in reported
        assert reported["publishError"].startswith("copying to volume adapters: ")


def test_several_processes_without_their_launch_configuration_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(trainer.WorkloadError) as caught:
        trainer.launch({}, config_dir=tmp_path, output_dir=tmp_path / "out", processes=2)
    assert caught.value.code == TrainExit.INVALID_CONFIG
    assert "accelerate.yaml is missing" in str(caught.value)


def test_the_launch_runs_our_worker_in_each_process(tmp_path: Path) -> None:
    command = trainer.launch_command(tmp_path, 4, tmp_path / "args.json", 29999, cpu=False)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--num_processes=4" in command
    assert command[-3:] == ["--module", "kimi_operator.workloads.train.worker", str(tmp_path / "args.json")]
    assert "--mixed_precision=no" in trainer.launch_command(tmp_path, 2, tmp_path / "a.json", 1, cpu=True)


def test_a_checkpoint_of_several_kt_processes_counts_only_with_its_manifest(tmp_path: Path) -> None:
    """transformers-kt writes trainer_state.json before the per-rank optimizer manifest, and refuses
    to resume without it: a pod killed between the two resumes from the checkpoint before."""
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        (tmp_path / f"checkpoint-{step}" / "optimizer_rank_00000.pt").write_bytes(b"")
    (tmp_path / "checkpoint-3" / "kt_optimizer.index.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    (tmp_path / "checkpoint-6" / "kt_optimizer.index.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6"


def test_a_refusal_left_half_written_is_not_read_as_one(tmp_path: Path) -> None:
    args_file = tmp_path / ".launch" / "train-args.json"
    args_file.parent.mkdir()
    trainer.refuse(args_file, "LLaMA-Factory refused the configuration: cpu_infer")
    assert [p.name for p in args_file.parent.iterdir()] == ["refused-0.json"]


def test_llamafactorys_paths_come_from_the_arguments_and_the_registry_is_written_after_validation(
    tmp_path: Path,
) -> None:
    config_dir, out = tmp_path / "config", tmp_path / "out"
    config_dir.mkdir()
    (config_dir / train.DATASET_INFO_FILE).write_text(json.dumps({"kimi_sft": {"file_name": "/o/dataset.jsonl"}}))
    opts = types.SimpleNamespace(config_dir=config_dir, output_dir=out, model_dir=tmp_path / "bf16")
    args = train._with_paths({"model_name_or_path": "/m/bf16", "output_dir": "/o", "dataset_dir": "/c"}, opts)
    assert args == {"model_name_or_path": str(tmp_path / "bf16"), "output_dir": str(out), "dataset_dir": str(out)}
    assert not out.exists()  # nothing written before the dataset is judged
    out.mkdir()
    train._register_dataset(opts)
    registry = json.loads((out / train.DATASET_INFO_FILE).read_text())
    assert registry == {"kimi_sft": {"file_name": train.LLAMAFACTORY_DATASET}}
    # A user's --set still wins over the paths.
    assert train._override(args, ['output_dir="/elsewhere"'])["output_dir"] == "/elsewhere"

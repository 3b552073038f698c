import json
from pathlib import Path

from kimi_operator.workloads.train import LogTail, latest_checkpoint, progress_from_log, to_llamafactory


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

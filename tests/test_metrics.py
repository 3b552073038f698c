"""Training progress as Prometheus gauges, read back through the exposition format."""

from __future__ import annotations

from prometheus_client import generate_latest

from kimi_operator.controller import metrics


def scrape(name: str, prefix: str = "kimi_operator_finetune_") -> dict[str, float]:
    """One object's gauges as a scraper would read them (series name, with the node when there is one)."""
    found = {}
    for line in generate_latest(metrics.REGISTRY).decode().splitlines():
        if line.startswith(prefix) and f'name="{name}"' in line:
            series, value = line.rsplit(" ", 1)
            node = series.split('node="')[1].split('"')[0] if 'node="' in series else ""
            key = series.split("{")[0].removeprefix(prefix)
            found[f"{key}@{node}" if node else key] = float(value)
    return found


def test_progress_becomes_gauges_and_goes_with_the_job() -> None:
    progress = {
        "step": 12,
        "totalSteps": 48,
        "percent": 25.0,
        "loss": 1.25,
        "learningRate": 2e-5,
        "epoch": 0.75,
        "tokensPerSecond": 41.5,
        "eta": "1 day, 0:12:00",
        "lastUpdateTime": "2026-01-01T00:00:00Z",
    }
    metrics.record_training("ml", "tune", progress)
    assert scrape("tune") == {
        "step": 12,
        "total_steps": 48,
        "progress_percent": 25.0,
        "loss": 1.25,
        "learning_rate": 2e-5,
        "epoch": 0.75,
        "tokens_per_second": 41.5,
        "eta_seconds": 86400 + 720,
    }
    # A later report without a rate (a resumed pod's first lines) drops the stale rate.
    metrics.record_training("ml", "tune", {**progress, "tokensPerSecond": None, "step": 13})
    assert "tokens_per_second" not in scrape("tune")
    assert scrape("tune")["step"] == 13
    metrics.forget("FineTuneJob", "ml", "tune")
    assert scrape("tune") == {}


def test_prepare_progress_per_node_and_nodes_that_leave() -> None:
    nodes = [
        {
            "name": "n1",
            "phase": "Preparing",
            "progress": {
                "step": "Downloading",
                "bytesDone": 3 << 30,
                "bytesTotal": 12 << 30,
                "percent": 25,
                "bytesPerSecond": 200 << 20,
                "eta": "0:00:46",
                "updateTime": "2026-01-01T00:00:00Z",
            },
        },
        {"name": "n2", "phase": "Ready"},
    ]
    metrics.record_model("ml", "kimi", nodes)
    prefix = "kimi_operator_model_"
    assert scrape("kimi", prefix) == {
        "prepare_bytes_done@n1": 3 << 30,
        "prepare_bytes_total@n1": 12 << 30,
        "prepare_percent@n1": 25,
        "prepare_bytes_per_second@n1": 200 << 20,
        "prepare_eta_seconds@n1": 46,
        "node_ready@n1": 0,
        "node_ready@n2": 1,
    }
    # n1 is no longer placed: its series go, n2's stay.
    metrics.record_model("ml", "kimi", nodes[1:])
    assert scrape("kimi", prefix) == {"node_ready@n2": 1}
    metrics.forget("KimiModel", "ml", "kimi")
    assert scrape("kimi", prefix) == {}

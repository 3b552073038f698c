"""Training progress as Prometheus gauges, read back through the exposition format."""

from __future__ import annotations

from prometheus_client import generate_latest

from kimi_operator.controller import metrics


def scrape(name: str) -> dict[str, float]:
    """The training gauges of one FineTuneJob as a scraper would read them."""
    found = {}
    for line in generate_latest(metrics.REGISTRY).decode().splitlines():
        if line.startswith("kimi_operator_finetune_") and f'name="{name}"' in line:
            metric, value = line.rsplit(" ", 1)
            found[metric.split("{")[0].removeprefix("kimi_operator_finetune_")] = float(value)
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

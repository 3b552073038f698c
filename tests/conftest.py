"""Shared fixtures of the unit tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import close_session, constants

from tests.checkpoints import run_oracle
from tests.processes import built


@pytest.fixture(scope="session")
def oracle_python() -> str:
    """The oracle environment (torch + compressed-tensors), built by `make oracle-env`."""
    return built("KIMI_ORACLE_PYTHON", "the oracle environment's python", "unit")


@pytest.fixture(scope="session")
def tiny_checkpoint_source(oracle_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Kimi-shaped checkpoint and compressed-tensors' reference decompression (read-only)."""
    out = tmp_path_factory.mktemp("kimi-tiny")
    run_oracle(oracle_python, "make", str(out))
    return out


@pytest.fixture
def tiny_checkpoint(tiny_checkpoint_source: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may corrupt."""
    shutil.copytree(tiny_checkpoint_source / "model", tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def isolated_hub_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No stored token, cache, proxy or offline switch of the machine reaches the client."""
    home = tmp_path / "hf-home"
    env = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # The client reads its settings once, at import: set the copies it actually consults.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    close_session()  # a fresh HTTP client, built from this environment
    yield
    close_session()


@pytest.fixture(scope="session")
def train_python() -> str:
    """The training environment (LLaMA-Factory 0.9.5, torch), built by `make train-env`."""
    return built("KIMI_TRAIN_PYTHON", "the training environment's python", "unit")


@pytest.fixture(scope="session")
def kt_python() -> str:
    """The KTransformers training environment (kt-kernel, transformers-kt, accelerate-kt), `make kt-env`."""
    return built("KIMI_KT_PYTHON", "the KTransformers environment's python", "unit")

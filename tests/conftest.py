"""Shared fixtures of the unit tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.checkpoints import run_oracle


@pytest.fixture(scope="session")
def oracle_python() -> str:
    """The oracle environment (torch + compressed-tensors), built by `make oracle-env`."""
    python = os.environ.get("KIMI_ORACLE_PYTHON")
    if not python or not Path(python).exists():
        pytest.fail("KIMI_ORACLE_PYTHON is not set to the oracle environment's python: run the tests with `make unit`")
    return python


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

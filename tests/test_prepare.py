"""`kimi-operator prepare` end to end on this machine: steps, markers, exit codes, messages."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kimi_operator.api.exitcodes import PrepareExit
from kimi_operator.devcluster.hub import FakeHub
from kimi_operator.workloads import manifest
from kimi_operator.workloads.prepare import command as prepare


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, object]], str]:
    code = prepare.main(list(args))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def test_local_checkpoint_to_bf16_then_nothing_to_do(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models" / "ml" / "kimi"
    code, events, err = run(
        capsys, f"--root={root}", "--variants=bf16", f"--source-path={tiny_checkpoint}", "--threads=2"
    )
    assert code == 0, err
    assert manifest.verify(root / "bf16") == []
    steps = [e["step"] for e in events]
    assert steps[0] == "ConvertingBF16"
    assert steps[-1] == "Done"
    converting = [e for e in events if e["step"] == "ConvertingBF16"]
    assert converting[-1]["percent"] == 100
    assert converting[-1]["bytesDone"] == converting[-1]["bytesTotal"]
    # Second run: every step is marked done, nothing is converted again.
    before = (root / "bf16" / "manifest.json").stat().st_mtime_ns
    code, events, _ = run(capsys, f"--root={root}", "--variants=bf16", f"--source-path={tiny_checkpoint}")
    assert code == 0
    assert [e["step"] for e in events] == ["Done"]
    assert (root / "bf16" / "manifest.json").stat().st_mtime_ns == before


def test_disk_too_small_exits_with_its_code_and_both_numbers(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KIMI_OPERATOR_DISK_LIMIT_BYTES", "1000")
    code, _, err = run(capsys, f"--root={tmp_path / 'm'}", "--variants=bf16", f"--source-path={tiny_checkpoint}")
    assert code == PrepareExit.INSUFFICIENT_DISK == 11
    error = json.loads(err.strip().splitlines()[-1])
    assert error["reason"] == "InsufficientDisk"
    assert "only 1000 bytes (1000 B) are free" in error["message"]
    assert "BF16 conversion needs" in error["message"]
    assert manifest.read(tmp_path / "m" / "bf16") is None


def test_broken_checkpoint_exits_before_any_work(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tiny_checkpoint / "model-00002-of-00003.safetensors").unlink()
    code, events, err = run(capsys, f"--root={tmp_path / 'm'}", "--variants=bf16", f"--source-path={tiny_checkpoint}")
    assert code == PrepareExit.INVALID_CHECKPOINT
    assert "model-00002-of-00003.safetensors" in json.loads(err.strip().splitlines()[-1])["message"]
    assert events == []
    assert not (tmp_path / "m" / "bf16").exists()


def test_cpu_variant_without_the_converter_says_what_is_missing(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(prepare.KT_CONVERTER_ENV, raising=False)
    code, _, err = run(capsys, f"--root={tmp_path / 'm'}", "--variants=cpu-int8", f"--source-path={tiny_checkpoint}")
    assert code == PrepareExit.CONVERTER_UNAVAILABLE
    message = json.loads(err.strip().splitlines()[-1])["message"]
    assert "KT_CONVERT_SCRIPT is unset" in message
    # The BF16 input of the CPU converter was made and is complete.
    assert manifest.verify(tmp_path / "m" / "bf16") == []


def test_remove_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ml" / "kimi"
    (root / "bf16").mkdir(parents=True)
    (root / "bf16" / "x").write_text("x")
    assert prepare.remove_main([f"--root={root}"]) == 0
    assert not root.exists()
    assert (tmp_path / "ml").exists()
    shutil.rmtree(tmp_path / "ml")


REPO = "moonshotai/Tiny-K2.5"


@pytest.fixture
def hub_with_checkpoint(tiny_checkpoint: Path, isolated_hub_client: None) -> Iterator[tuple[FakeHub, str]]:
    files = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir()}
    with FakeHub(token="hf_secret_token_123") as server:
        sha = server.add_commit(REPO, files)
        yield server, sha


def test_download_verify_convert_from_the_hub(
    hub_with_checkpoint: tuple[FakeHub, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, sha = hub_with_checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    root = tmp_path / "m"
    args = (f"--root={root}", "--variants=bf16", f"--repo={REPO}", "--revision=main", f"--endpoint={server.endpoint}")
    code, events, err = run(capsys, *args)
    assert code == 0, err
    steps = [e["step"] for e in events]
    assert (
        steps.index("DiskCheck") < steps.index("Downloading") < steps.index("Verifying") < steps.index("ConvertingBF16")
    )
    assert all(e.get("revision") == sha for e in events if e["step"] != "DiskCheck" or e.get("revision"))
    native = manifest.read(root / "int4")
    assert native is not None
    assert native["revision"] == sha
    assert native["variant"] == "native-int4"
    assert manifest.verify(root / "int4") == []
    assert manifest.read(root / "bf16")["revision"] == sha  # type: ignore[index]
    assert "hf_secret_token_123" not in capsys.readouterr().out + err
    # Again: everything is verified and marked, so nothing is fetched a second time.
    shard = "model-00001-of-00003.safetensors"
    fetched = len(server.gets(REPO, shard))
    code, events, _ = run(capsys, *args)
    assert code == 0
    assert [e["step"] for e in events] == ["Done"]
    assert len(server.gets(REPO, shard)) == fetched


def test_bad_token_exits_with_its_code_and_never_shows_the_token(
    hub_with_checkpoint: tuple[FakeHub, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, _ = hub_with_checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_456")
    code, _, err = run(
        capsys,
        f"--root={tmp_path / 'm'}",
        "--variants=bf16",
        f"--repo={REPO}",
        "--revision=main",
        f"--endpoint={server.endpoint}",
    )
    assert code == PrepareExit.BAD_TOKEN
    assert json.loads(err.strip().splitlines()[-1])["reason"] == "BadToken"
    assert "hf_wrong_token_456" not in err


def test_unknown_revision_exits_with_its_code(
    hub_with_checkpoint: tuple[FakeHub, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, _ = hub_with_checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    code, _, err = run(
        capsys,
        f"--root={tmp_path / 'm'}",
        "--variants=bf16",
        f"--repo={REPO}",
        "--revision=v9.9",
        f"--endpoint={server.endpoint}",
    )
    assert code == PrepareExit.UNKNOWN_REVISION
    assert "v9.9" in json.loads(err.strip().splitlines()[-1])["message"]


def test_disk_too_small_for_the_download(
    hub_with_checkpoint: tuple[FakeHub, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, _ = hub_with_checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    monkeypatch.setenv("KIMI_OPERATOR_DISK_LIMIT_BYTES", "4096")
    code, _, err = run(
        capsys,
        f"--root={tmp_path / 'm'}",
        "--variants=bf16",
        f"--repo={REPO}",
        "--revision=main",
        f"--endpoint={server.endpoint}",
    )
    assert code == PrepareExit.INSUFFICIENT_DISK
    message = json.loads(err.strip().splitlines()[-1])["message"]
    assert message.startswith("download needs ")
    assert "only 4096 bytes" in message
    assert server.gets(REPO, "model-00001-of-00003.safetensors") == []

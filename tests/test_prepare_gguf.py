"""The gguf variant of a KimiModel: one quantization of a GGUF repository, and only its files,
downloaded from a hub (devcluster/hub.py) at a pinned revision, resumed, verified and marked, without
the INT4 checkpoint; a quantization the repository lacks is refused with the ones it has."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from kimi_operator.api.exitcodes import PrepareExit
from kimi_operator.api.kimimodel import KimiModelSpec, KimiModelStatus
from kimi_operator.devcluster.hub import FakeHub
from kimi_operator.render import kimimodel as render
from kimi_operator.workloads import manifest
from kimi_operator.workloads.hub import RemoteFile
from kimi_operator.workloads.prepare import command as prepare
from kimi_operator.workloads.prepare import gguf
from kimi_operator.workloads.termination import WorkloadError

GGUF_REPO = "unsloth/Kimi-K2.5-GGUF"
# The INT4 checkpoint's repository is not on this hub: a gguf-only model must never ask for it.
INT4_REPO = "moonshotai/Kimi-K2.5"
FIRST = "UD-TQ1_0/Kimi-K2.5-UD-TQ1_0-00001-of-00002.gguf"
SECOND = "UD-TQ1_0/Kimi-K2.5-UD-TQ1_0-00002-of-00002.gguf"
OTHERS = [
    "UD-Q2_K_XL/Kimi-K2.5-UD-Q2_K_XL-00001-of-00002.gguf",
    "UD-Q2_K_XL/Kimi-K2.5-UD-Q2_K_XL-00002-of-00002.gguf",
    "Kimi-K2.5-Q8_0.gguf",
    "mmproj-F16.gguf",
    "README.md",
]


def listing(*paths: str) -> list[RemoteFile]:
    return [RemoteFile(path=p, size=1, sha256=None, git_sha1=None) for p in paths]


def test_quantizations_of_a_repository_in_the_guides_layout() -> None:
    paths = [FIRST, SECOND, *OTHERS, "BF16/Kimi-K2.5-BF16-00001-of-00046.gguf"]
    assert gguf.quantizations(paths) == ["BF16", "Q8_0", "UD-Q2_K_XL", "UD-TQ1_0"]
    chosen = gguf.select(GGUF_REPO, listing(*paths), "UD-TQ1_0")
    assert [f.path for f in chosen] == [FIRST, SECOND]
    assert gguf.entry(chosen) == FIRST
    # A single file at the top of the repository.
    single = gguf.select(GGUF_REPO, listing(*paths), "Q8_0")
    assert gguf.entry(single) == "Kimi-K2.5-Q8_0.gguf"


def test_a_missing_quantization_is_refused_with_the_ones_the_repository_has() -> None:
    with pytest.raises(WorkloadError) as caught:
        gguf.select(GGUF_REPO, listing(FIRST, SECOND, *OTHERS), "UD-Q4_K_XL")
    assert caught.value.code == PrepareExit.QUANTIZATION_NOT_FOUND
    assert str(caught.value) == (
        "unsloth/Kimi-K2.5-GGUF has no quantization 'UD-Q4_K_XL'; it has: Q8_0, UD-Q2_K_XL, UD-TQ1_0"
    )


@pytest.fixture
def hub_with_gguf(isolated_hub_client: None) -> Iterator[tuple[FakeHub, str, dict[str, bytes]]]:
    # The first part is larger than one download chunk, so a dropped connection can be resumed.
    files = {FIRST: b"G" * (constants.DOWNLOAD_CHUNK_SIZE + 5000), SECOND: b"H" * 3000}
    files.update({path: path.encode() * 50 for path in OTHERS})
    with FakeHub() as server:
        sha = server.add_commit(GGUF_REPO, files, lfs={p for p in files if p.endswith(".gguf")})
        yield server, sha, files


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, object]], str]:
    code = prepare.main(list(args))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def args(root: Path, server: FakeHub, quantization: str) -> list[str]:
    return [
        f"--root={root}",
        "--variants=gguf",
        f"--repo={INT4_REPO}",
        "--revision=main",
        f"--endpoint={server.endpoint}",
        f"--gguf-repo={GGUF_REPO}",
        "--gguf-revision=main",
        f"--gguf-quantization={quantization}",
        f"--gguf-endpoint={server.endpoint}",
    ]


def test_only_the_chosen_quantization_is_downloaded_resumed_verified_and_marked(
    hub_with_gguf: tuple[FakeHub, str, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, sha, files = hub_with_gguf
    root = tmp_path / "m"
    server.drop_after(GGUF_REPO, FIRST, constants.DOWNLOAD_CHUNK_SIZE + 100)
    code, events, err = run(capsys, *args(root, server, "UD-TQ1_0"))
    assert code == 0, err
    steps = [e["step"] for e in events]
    assert steps.index("DiskCheck") < steps.index("Downloading") < steps.index("Verifying") < steps.index("Done")
    # The GGUF repository's commit is what status reports for it (resolvedGgufRevision).
    assert {e.get("ggufRevision") for e in events if e["step"] != "DiskCheck"} == {sha}
    # And the file to load (status.ggufEntry, what a llama.cpp LoraServer's engines are given).
    assert {e.get("ggufEntry") for e in events if e["step"] != "DiskCheck"} == {
        "Kimi-K2.5-UD-TQ1_0-00001-of-00002.gguf"
    }
    # The connection dropped inside the first part: it went on from the bytes it had.
    assert server.ranges(GGUF_REPO, FIRST) == [f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]
    for path in OTHERS:
        assert server.gets(GGUF_REPO, path) == [], path
    target = root / "gguf" / "UD-TQ1_0"
    assert (target / FIRST.split("/", 1)[1]).read_bytes() == files[FIRST]
    marked = manifest.read(target)
    assert marked is not None
    assert (marked["variant"], marked["revision"]) == ("gguf", sha)
    # llama.cpp is given the first part and finds the second beside it.
    assert marked["entry"] == "Kimi-K2.5-UD-TQ1_0-00001-of-00002.gguf"
    assert sorted(f["path"] for f in marked["files"]) == [p.split("/", 1)[1] for p in (FIRST, SECOND)]
    assert manifest.verify(target) == []
    assert not (root / "int4").exists()

    # Again: marked complete at this revision, so nothing is fetched a second time.
    fetched = len(server.gets(GGUF_REPO, FIRST))
    code, events, _ = run(capsys, *args(root, server, "UD-TQ1_0"))
    assert code == 0
    assert [e["step"] for e in events] == ["Done"]
    assert events[0]["ggufEntry"] == "Kimi-K2.5-UD-TQ1_0-00001-of-00002.gguf"
    assert len(server.gets(GGUF_REPO, FIRST)) == fetched


def test_a_missing_quantization_fails_the_pod_with_its_code_before_any_download(
    hub_with_gguf: tuple[FakeHub, str, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _, _ = hub_with_gguf
    code, _, err = run(capsys, *args(tmp_path / "m", server, "UD-Q4_K_XL"))
    assert code == PrepareExit.QUANTIZATION_NOT_FOUND
    error = json.loads(err.strip().splitlines()[-1])
    assert error["reason"] == "QuantizationNotFound"
    assert error["message"].endswith("it has: Q8_0, UD-Q2_K_XL, UD-TQ1_0")
    assert all(server.gets(GGUF_REPO, path) == [] for path in (FIRST, SECOND, *OTHERS))


def test_a_single_file_quantization_lands_in_its_own_directory(
    hub_with_gguf: tuple[FakeHub, str, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _, files = hub_with_gguf
    root = tmp_path / "m"
    code, _, err = run(capsys, *args(root, server, "Q8_0"))
    assert code == 0, err
    target = root / "gguf" / "Q8_0"
    assert (target / "Kimi-K2.5-Q8_0.gguf").read_bytes() == files["Kimi-K2.5-Q8_0.gguf"]
    assert manifest.read(target)["entry"] == "Kimi-K2.5-Q8_0.gguf"  # type: ignore[index]
    assert server.gets(GGUF_REPO, FIRST) == []


def gguf_spec(quantization: str = "UD-TQ1_0", variants: tuple[str, ...] = ("gguf",)) -> KimiModelSpec:
    return KimiModelSpec.model_validate(
        {
            "source": {"path": {"path": "/models/kimi-int4"}},
            "placement": {"nodeNames": ["n1"]},
            "storage": {"hostPath": "/mnt/nvme/kimi"},
            "variants": list(variants),
            "gguf": {
                "huggingFace": {
                    "repo": GGUF_REPO,
                    "revision": "def",
                    "tokenSecretRef": {"name": "hf", "key": "token"},
                },
                "quantization": quantization,
            },
        }
    )


def test_the_prepare_job_names_the_quantization_and_passes_its_token_by_the_environment() -> None:
    owner = render.owner("ml", "kimi", "uid-1")
    job = render.prepare_job(owner, gguf_spec(), "n1", image="p:1")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "--variants=gguf" in container["args"]
    for arg in (f"--gguf-repo={GGUF_REPO}", "--gguf-revision=def", "--gguf-quantization=UD-TQ1_0"):
        assert arg in container["args"]
    token = {"name": "HF_TOKEN_GGUF", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert token in container["env"]
    # gguf alone: nothing of the INT4 checkpoint, not even its directory (which may not exist there).
    assert not [a for a in container["args"] if a.startswith(("--repo=", "--source-path="))]
    assert "source" not in {v["name"] for v in pod["volumes"]}
    both = render.prepare_job(owner, gguf_spec(variants=("gguf", "bf16")), "n1", image="p:1")
    assert "--source-path=" + render.SOURCE_MOUNT in both["spec"]["template"]["spec"]["containers"][0]["args"]
    # Another quantization (spec.gguf dropped and set anew) is another Job, not the finished one.
    other = render.prepare_job(owner, gguf_spec("UD-Q2_K_XL"), "n1", image="p:1")
    assert other["metadata"]["name"] != job["metadata"]["name"]


def test_a_node_holding_every_variant_fits_the_status() -> None:
    every = ["bf16", "cpu-int8", "cpu-int4", "native-int4", "gguf"]
    status = KimiModelStatus.model_validate({"nodes": [{"name": "n1", "phase": "Ready", "variants": every}]})
    assert status.nodes[0].variants == every

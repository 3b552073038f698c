"""The hub download module against the real huggingface_hub client and a fake hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from kimi_operator.devcluster.hub import FakeHub, git_blob_sha1
from kimi_operator.workloads import hub

REPO = "moonshotai/Tiny-K2"
# The client streams in chunks of this size and writes only whole chunks before a failure.
CHUNK = constants.DOWNLOAD_CHUNK_SIZE
CONFIG = b'{"model_type": "kimi_k2"}\n'


pytestmark = pytest.mark.usefixtures("isolated_hub_client")


@pytest.fixture
def fake() -> Iterator[FakeHub]:
    with FakeHub() as server:
        yield server


def checkpoint() -> dict[str, bytes]:
    return {
        "config.json": CONFIG,
        "tokenizer_config.json": b'{"bos": 1}\n',
        "model.safetensors.index.json": b'{"weight_map": {}}\n' + b" " * 2000,  # over 1 KiB: LFS
        "model-00001-of-00002.safetensors": os.urandom(3000),
        "model-00002-of-00002.safetensors": os.urandom(CHUNK + 4321),
        "sub/dir/extra.py": b"print('x')\n",
    }


def fetch(
    server: FakeHub, sha: str, dest: Path, files: list[hub.RemoteFile], *, token: str | None = None, workers: int = 2
) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    hub.download(
        REPO,
        sha,
        dest,
        files,
        token=token,
        endpoint=server.endpoint,
        max_workers=workers,
        on_progress=lambda done, total: calls.append((done, total)),
    )
    return calls


def test_resolve_lists_every_file_with_size_and_checksum(fake: FakeHub) -> None:
    content = checkpoint()
    sha = fake.add_commit(REPO, content)
    fake.add_tag(REPO, "v1.0", sha)

    resolved, files = hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)

    assert resolved == sha
    assert hub.resolve(REPO, "v1.0", token=None, endpoint=fake.endpoint)[0] == sha
    assert hub.resolve(REPO, sha, token=None, endpoint=fake.endpoint) == (sha, files)
    by_path = {f.path: f for f in files}
    assert sorted(by_path) == sorted(content)
    for path, data in content.items():
        assert by_path[path].size == len(data)
    for lfs in ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert by_path[lfs].sha256 == hashlib.sha256(content[lfs]).hexdigest()
        assert by_path[lfs].git_sha1 is None
    for small in ("config.json", "tokenizer_config.json", "sub/dir/extra.py"):
        assert by_path[small].sha256 is None
        blob = b"blob %d\0%s" % (len(content[small]), content[small])
        assert by_path[small].git_sha1 == hashlib.sha1(blob).hexdigest()  # noqa: S324 - git's object id


def test_download_writes_the_repository_layout_and_verifies(fake: FakeHub, tmp_path: Path) -> None:
    content = checkpoint()
    fake.add_commit(REPO, content)
    sha, files = hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)
    dest = tmp_path / "int4"

    calls = fetch(fake, sha, dest, files)

    for path, data in content.items():
        assert (dest / path).read_bytes() == data
    assert hub.verify(dest, files) == []
    assert not list(dest.rglob("*.partial"))
    total = sum(len(d) for d in content.values())
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert 1 <= fake.max_in_flight <= 2
    # Pinned: every file came from the resolved commit, never from the branch name.
    assert all(f"/resolve/{sha}/" in s.path for s in fake.seen if "/resolve/" in s.path)


def test_a_download_pinned_to_a_sha_ignores_later_commits(fake: FakeHub, tmp_path: Path) -> None:
    first = fake.add_commit(REPO, checkpoint())
    sha, files = hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)
    second = fake.add_commit(REPO, {"config.json": b'{"model_type": "changed"}\n'})

    fetch(fake, sha, tmp_path, files)

    assert sha == first != second
    assert hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)[0] == second
    assert (tmp_path / "config.json").read_bytes() == CONFIG
    assert hub.verify(tmp_path, files) == []


def test_verify_names_corrupted_truncated_and_missing_files(fake: FakeHub, tmp_path: Path) -> None:
    content = checkpoint()
    fake.add_commit(REPO, content)
    sha, files = hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)
    fetch(fake, sha, tmp_path, files)
    by_path = {f.path: f for f in files}

    shard = tmp_path / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[1234] ^= 0x01
    shard.write_bytes(bytes(data))
    config = tmp_path / "config.json"
    config.write_bytes(CONFIG.replace(b"k2", b"K2"))  # same size, other bytes: only the git blob id tells
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(content["model.safetensors.index.json"][:-10])
    (tmp_path / "sub/dir/extra.py").unlink()

    problems = hub.verify(tmp_path, files)

    assert len(problems) == 4
    by_file = {p.split(": ", 1)[0]: p for p in problems}
    assert set(by_file) == {str(shard), str(config), str(index), str(tmp_path / "sub/dir/extra.py")}
    assert by_path[shard.name].sha256 in by_file[str(shard)]
    assert hashlib.sha256(bytes(data)).hexdigest() in by_file[str(shard)]
    assert f"expected {git_blob_sha1(CONFIG)}" in by_file[str(config)]
    assert f"{len(content[index.name]) - 10} bytes, expected {len(content[index.name])}" in by_file[str(index)]
    assert "missing" in by_file[str(tmp_path / "sub/dir/extra.py")]


def test_a_rerun_skips_verified_files_and_refetches_altered_ones(fake: FakeHub, tmp_path: Path) -> None:
    content = checkpoint()
    fake.add_commit(REPO, content)
    sha, files = hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)
    fetch(fake, sha, tmp_path, files)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    with shard.open("r+b") as fh:
        fh.seek(10)
        fh.write(bytes([content[shard.name][10] ^ 0xFF]))
    before = {path: len(fake.gets(REPO, path)) for path in content}

    total = sum(len(d) for d in content.values())
    assert fetch(fake, sha, tmp_path, files)[-1] == (total, total)

    fetched_again = {path for path in content if len(fake.gets(REPO, path)) > before[path]}
    assert fetched_again == {shard.name}
    assert shard.read_bytes() == content[shard.name]
    assert hub.verify(tmp_path, files) == []


def test_a_dropped_connection_resumes_with_a_range_request(fake: FakeHub, tmp_path: Path) -> None:
    content = checkpoint()
    big = "model-00002-of-00002.safetensors"
    fake.add_commit(REPO, content)
    sha, files = hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)
    fake.drop_after(REPO, big, CHUNK + 100)

    fetch(fake, sha, tmp_path, files)

    assert fake.ranges(REPO, big) == [f"bytes={CHUNK}-"]
    assert len(fake.gets(REPO, big)) == 2
    # Sent once in full, not twice: the first chunk survived the drop.
    assert fake.body_bytes[(REPO, big)] == len(content[big]) + 100
    assert hub.verify(tmp_path, files) == []


class Interrupted(Exception):
    pass


def test_an_interrupted_run_is_resumed_by_the_next_with_a_range_request(fake: FakeHub, tmp_path: Path) -> None:
    big = "model-00002-of-00002.safetensors"
    data = os.urandom(2 * CHUNK + 999)
    fake.add_commit(REPO, {big: data, "config.json": CONFIG})
    sha, files = hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)
    total = len(data) + len(CONFIG)

    def die_after_first_chunk(done: int, _total: int) -> None:
        if done >= CHUNK:
            raise Interrupted  # as if the pod were killed with one chunk on disk

    with pytest.raises(Interrupted):
        hub.download(
            REPO,
            sha,
            tmp_path,
            files,
            token=None,
            endpoint=fake.endpoint,
            max_workers=1,
            on_progress=die_after_first_chunk,
        )
    assert not (tmp_path / big).exists()
    assert (tmp_path / f"{big}.partial").stat().st_size == CHUNK
    assert fake.ranges(REPO, big) == []

    calls = fetch(fake, sha, tmp_path, files, workers=1)

    assert fake.ranges(REPO, big) == [f"bytes={CHUNK}-"]
    assert (tmp_path / big).read_bytes() == data
    assert hub.verify(tmp_path, files) == []
    assert calls[0][0] == CHUNK  # the resumed bytes count as done from the start
    assert calls[-1] == (total, total)


def test_a_server_ignoring_range_restarts_the_file_cleanly(fake: FakeHub, tmp_path: Path) -> None:
    big = "model-00002-of-00002.safetensors"
    data = os.urandom(CHUNK + 999)
    fake.add_commit(REPO, {big: data})
    sha, files = hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)
    stale = b"bytes from some other download"
    (tmp_path / f"{big}.partial").write_bytes(stale)
    fake.honor_range = False

    calls = fetch(fake, sha, tmp_path, files)

    assert fake.ranges(REPO, big) == [f"bytes={len(stale)}-"]  # asked, and got the whole file instead
    assert (tmp_path / big).read_bytes() == data
    assert (tmp_path / f"{big}.sha256").read_text().strip() == hashlib.sha256(data).hexdigest()
    assert calls[-1] == (len(data), len(data))
    assert max(done for done, _ in calls) == len(data)


def test_a_private_repository_needs_the_right_token(tmp_path: Path) -> None:
    good, bad = "hf_GoodToken", "hf_wrong-secret-1234567890"
    with FakeHub(token=good) as private:
        private.add_commit(REPO, {"config.json": CONFIG})

        sha, files = hub.resolve(REPO, "main", token=good, endpoint=private.endpoint)
        fetch(private, sha, tmp_path, files, token=good)
        assert hub.verify(tmp_path, files) == []
        assert {s.token for s in private.seen} == {good}

        with pytest.raises(hub.HubAuthError) as rejected:
            hub.resolve(REPO, "main", token=bad, endpoint=private.endpoint)
        with pytest.raises(hub.HubAuthError) as anonymous:
            hub.resolve(REPO, "main", token=None, endpoint=private.endpoint)
        (tmp_path / "config.json").unlink()
        with pytest.raises(hub.HubAuthError) as download_rejected:
            fetch(private, sha, tmp_path, files, token=bad)

    for error in (rejected.value, download_rejected.value):
        assert "token" in str(error)
        assert bad not in str(error)
        assert bad not in repr(error.args)
    assert "anonymous" in str(anonymous.value)
    assert str(rejected.value).startswith(f"{REPO}@main: ")
    assert str(download_rejected.value).startswith(f"{REPO}@{sha}: ")


def test_no_ambient_token_is_sent(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_from-the-environment")
    fake.add_commit(REPO, {"config.json": CONFIG})

    hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)

    assert [s.token for s in fake.seen] == [None]


def test_unknown_revision_and_repository(fake: FakeHub) -> None:
    fake.add_commit(REPO, {"config.json": CONFIG})

    with pytest.raises(hub.RevisionNotFound) as revision:
        hub.resolve(REPO, "no-such-branch", token=None, endpoint=fake.endpoint)
    with pytest.raises(hub.RepoNotFound) as repo:
        hub.resolve("moonshotai/nope", "main", token="hf_any", endpoint=fake.endpoint)

    assert str(revision.value).startswith(f"{REPO}@no-such-branch: ")
    assert "no such revision" in str(revision.value)
    assert str(repo.value).startswith("moonshotai/nope@main: ")
    assert isinstance(revision.value, hub.HubError)
    assert isinstance(repo.value, hub.HubError)


def test_unsafe_paths_in_a_listing_are_refused(fake: FakeHub) -> None:
    fake.add_commit(REPO, {"../outside.json": CONFIG})

    with pytest.raises(hub.HubError, match="unsafe file path"):
        hub.resolve(REPO, "main", token=None, endpoint=fake.endpoint)

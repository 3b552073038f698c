"""Download and verify a model repository from the Hugging Face hub, pinned to one commit.

The hub client (``huggingface_hub``) does the HTTP: endpoints, authentication, redirects, retries and
Range requests. This module adds what a download of hundreds of gigabytes in a pod needs on top:

* everything is fetched at the commit sha ``resolve`` returned, so a branch moving mid-download cannot
  mix two revisions;
* each file streams into ``<path>.partial`` and keeps it when interrupted; the next run resumes it with a
  Range request (the client's ``hf_hub_download`` deletes its partial files on failure, so it is not used);
* each file is hashed as it is written and its sha256 recorded in ``<path>.sha256`` (the convention of
  ``safetensors_io``), so neither a rerun nor the completion manifest reads the whole checkpoint again;
* the client's errors become ``HubError`` subclasses whose messages name the repository and revision and
  never the token.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal, cast
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get

# Public helpers, but re-exported in a way strict mypy does not count as explicit.
from huggingface_hub.utils import build_hf_headers, silent_tqdm  # type: ignore[attr-defined]

from kimi_operator.workloads.safetensors_io import digest_path

_CHUNK = 8 << 20
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repository at the resolved commit, with what it must hash to."""

    path: str
    size: int
    sha256: str | None  # LFS files: the sha256 of the content
    git_sha1: str | None  # other files: the git blob id, sha1(b"blob <size>\0" + content)


class HubError(RuntimeError):
    """The hub could not give the repository at that revision."""

    def __init__(self, repo: str, revision: str, detail: str) -> None:
        self.repo, self.revision = repo, revision
        super().__init__(f"{repo}@{revision}: {detail}")


class HubAuthError(HubError):
    """401/403: the token is missing, invalid, or cannot read this repository."""


class RevisionNotFound(HubError):
    """The repository exists but has no such branch, tag or commit."""


class RepoNotFound(HubError):
    """The repository does not exist (or is hidden from this token)."""


def resolve(repo: str, revision: str, *, token: str | None, endpoint: str | None) -> tuple[str, list[RemoteFile]]:
    """The commit sha ``revision`` (a branch, tag or sha) points at, and every file there with its checksum."""
    with _translated(repo, revision, token):
        info = HfApi(endpoint=_endpoint(endpoint)).model_info(
            repo, revision=revision, files_metadata=True, token=_auth(token)
        )
    if not info.sha:
        raise HubError(repo, revision, "the hub did not name the commit of this revision")
    files = []
    for sibling in info.siblings or []:
        path = PurePosixPath(sibling.rfilename)
        # The listing becomes local paths: a hostile mirror must not write outside the target.
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise HubError(repo, revision, f"the hub listed an unsafe file path {sibling.rfilename!r}")
        if sibling.lfs is not None:
            files.append(RemoteFile(sibling.rfilename, sibling.lfs.size, sibling.lfs.sha256, None))
        elif sibling.size is not None and sibling.blob_id is not None:
            files.append(RemoteFile(sibling.rfilename, sibling.size, None, sibling.blob_id))
        else:
            raise HubError(repo, revision, f"the hub gave no size or checksum for {sibling.rfilename}")
    return info.sha, sorted(files, key=lambda f: f.path)


def download(
    repo: str,
    commit_sha: str,
    dest: Path,
    files: list[RemoteFile],
    *,
    token: str | None,
    endpoint: str | None,
    max_workers: int,
    on_progress: Progress | None = None,
) -> None:
    """Fetch ``files`` at ``commit_sha`` into ``dest``, ``max_workers`` files at a time.

    Files already present and verified are skipped; interrupted files resume. ``on_progress(done, total)``
    counts bytes on disk (skipped, resumed and newly written) and is called as each chunk arrives. A file
    whose content does not match its checksum is still put in place: ``verify`` then names it.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, not {max_workers}")
    progress = _Progress(sum(f.size for f in files), on_progress)
    stop = threading.Event()

    def fetch(file: RemoteFile) -> None:
        _fetch(repo, commit_sha, dest, file, token=token, endpoint=_endpoint(endpoint), progress=progress, stop=stop)

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hub-download") as pool:
        # Largest first, so that one big file does not start last and run alone at the end.
        futures = [pool.submit(fetch, f) for f in sorted(files, key=lambda f: f.size, reverse=True)]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f.exception() for f in done if f.exception() is not None), None)
        if failed is not None:
            # Running workers stop at their next chunk (keeping their partial files); queued ones never start.
            stop.set()
            for future in futures:
                future.cancel()
    if failed is not None:
        raise failed


def verify(dest: Path, files: list[RemoteFile], *, max_workers: int = 4) -> list[str]:
    """One problem per missing, resized or altered file, each starting with the file's path.

    Always reads every file: this is the check that the recorded digests and skipped files are trusted by.
    """
    # Hashing releases the GIL: a few threads keep a fast disk busy.
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hub-verify") as pool:
        found = list(pool.map(lambda f: _problem(dest / f.path, f)[0], files))
    return [p for p in found if p is not None]


def _problem(path: Path, file: RemoteFile) -> tuple[str | None, str | None]:
    """What is wrong with ``path`` (None when it matches), and its sha256 when it was read."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing (expected {file.size} bytes)", None
    if size != file.size:
        return f"{path}: {size} bytes, expected {file.size}", None
    sha256 = hashlib.sha256()
    # The git blob id hashes a header then the content; LFS files are checked by sha256 alone.
    git = hashlib.sha1(b"blob %d\0" % size) if file.git_sha1 is not None else None  # noqa: S324 - git's id, not security
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            sha256.update(block)
            if git is not None:
                git.update(block)
    digest = sha256.hexdigest()
    if file.sha256 is not None and digest != file.sha256:
        return f"{path}: sha256 {digest}, expected {file.sha256}", digest
    if git is not None and git.hexdigest() != file.git_sha1:
        return f"{path}: git blob sha1 {git.hexdigest()}, expected {file.git_sha1}", digest
    return None, digest


def _already_verified(path: Path, file: RemoteFile) -> bool:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != file.size:
        return False
    recorded = digest_path(path)
    # A digest recorded after the file's last write still describes it: skip reading it again.
    with contextlib.suppress(FileNotFoundError):
        if (
            file.sha256 is not None
            and recorded.stat().st_mtime_ns >= stat.st_mtime_ns
            and recorded.read_text().strip() == file.sha256
        ):
            return True
    problem, digest = _problem(path, file)
    if problem is None and digest is not None:
        recorded.write_text(digest + "\n")  # for the next run, and for the completion manifest
    return problem is None


def _fetch(
    repo: str,
    commit_sha: str,
    dest: Path,
    file: RemoteFile,
    *,
    token: str | None,
    endpoint: str | None,
    progress: _Progress,
    stop: threading.Event,
) -> None:
    target = dest / file.path
    if stop.is_set():
        return
    if _already_verified(target, file):
        progress.add(file.size)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with _translated(repo, commit_sha, token):
        url = hf_hub_url(repo, file.path, revision=commit_sha, endpoint=endpoint)
        meta = get_hf_file_metadata(url, token=_auth(token), endpoint=endpoint, retry_on_errors=True)
        headers = build_hf_headers(token=_auth(token))
        if _origin(meta.location) != _origin(url):
            # LFS content is served from a signed CDN address: the token stays with the hub.
            headers.pop("authorization", None)
        with _Sink(target, file.size, progress, stop) as sink:
            http_get(
                meta.location,
                cast(BinaryIO, sink),
                resume_size=sink.resumed,
                headers=headers,
                expected_size=file.size,
                tqdm_class=cast(Any, silent_tqdm),
            )
            sink.commit()


class _Stopped(Exception):
    """Another file failed: this one stops where it is and keeps its partial file."""


class _Sink:
    """``<path>.partial``, as the file object ``http_get`` writes to: hashes and counts bytes as they arrive.

    ``http_get`` writes, and when a server ignores a Range request it seeks back and truncates; any other
    use would desynchronise the running hash, so it is refused.
    """

    def __init__(self, target: Path, size: int, progress: _Progress, stop: threading.Event) -> None:
        self.target, self.partial = target, target.with_name(target.name + ".partial")
        self._progress, self._stop = progress, stop
        if self.partial.exists() and self.partial.stat().st_size > size:
            self.partial.unlink()
        self._fh = self.partial.open("r+b" if self.partial.exists() else "w+b")
        self._sha256 = hashlib.sha256()
        self._length = 0
        self.resumed = self._rehash(self._fh.seek(0, os.SEEK_END))
        progress.add(self.resumed)

    def _rehash(self, length: int) -> int:
        self._sha256, self._length = hashlib.sha256(), 0
        self._fh.seek(0)
        while self._length < length and (block := self._fh.read(min(_CHUNK, length - self._length))):
            self._sha256.update(block)
            self._length += len(block)
        return self._length

    def write(self, data: bytes) -> int:
        if self._stop.is_set():
            raise _Stopped
        if self._fh.tell() != self._length:
            raise RuntimeError(f"{self.partial}: write at {self._fh.tell()}, after {self._length} hashed bytes")
        written = self._fh.write(data)
        self._sha256.update(data)
        self._length += written
        self._progress.add(written)
        return written

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        before = self._length
        after = self._fh.truncate(size)
        self._progress.add(self._rehash(after) - before)
        return after

    def commit(self) -> None:
        self._fh.flush()
        # Durable before it gets its final name: a file in place is trusted on the next run.
        os.fsync(self._fh.fileno())
        self._fh.close()
        digest_path(self.target).write_text(self._sha256.hexdigest() + "\n")
        self.partial.replace(self.target)

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()  # on failure the partial file stays, for the next run to resume


class _Progress:
    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total, self.done, self._callback = total, 0, callback
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        # Under the lock: callers see one ordered sequence, whatever thread the bytes came from.
        with self._lock:
            self.done += n
            if self._callback is not None and n:
                self._callback(self.done, self.total)


def _auth(token: str | None) -> str | Literal[False]:
    # False, not None: the client would otherwise fall back to a token stored on the machine or in
    # HF_TOKEN, and send it to whatever endpoint this is.
    return token if token else False


def _endpoint(endpoint: str | None) -> str | None:
    return endpoint.rstrip("/") if endpoint else None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


@contextlib.contextmanager
def _translated(repo: str, revision: str, token: str | None) -> Iterator[None]:
    """The client's exceptions as ``HubError``s, chained to the original for debugging."""
    try:
        yield
    except (HfHubHTTPError, HFValidationError, FileMetadataError, OfflineModeIsEnabled, httpx2.HTTPError) as exc:
        raise _hub_error(exc, repo, revision, token) from exc


def _hub_error(exc: Exception, repo: str, revision: str, token: str | None) -> HubError:  # noqa: PLR0911 - a table
    def scrubbed(text: str) -> str:
        # Only text from elsewhere (the server, the transport) could carry the token: it never leaves here.
        return text.replace(token, "<token>") if token else text

    if isinstance(exc, RevisionNotFoundError):
        return RevisionNotFound(repo, revision, "the hub has no such revision (branch, tag or commit sha)")
    if isinstance(exc, GatedRepoError):
        who = "the token's account has not been granted access" if token else "no token was given"
        return HubAuthError(repo, revision, f"the repository is gated and {who}")
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
    if status == 401 and not token:
        # The hub answers 401 to anonymous requests for private, gated and missing repositories alike.
        return HubAuthError(
            repo, revision, "the hub refused anonymous access (401): the repository needs a token, or does not exist"
        )
    if status == 401:
        return HubAuthError(repo, revision, "the hub rejected the token (401): it is invalid, expired or revoked")
    if status == 403:
        return HubAuthError(repo, revision, "the token may not read this repository (403)")
    if isinstance(exc, RepositoryNotFoundError):
        return RepoNotFound(repo, revision, "no such repository, or it is private and the token cannot read it")
    if isinstance(exc, HFValidationError):
        return RepoNotFound(repo, revision, scrubbed(f"not a valid repository id: {exc}"))
    if isinstance(exc, HfHubHTTPError):
        said = f": {exc.server_message}" if exc.server_message else ""
        return HubError(repo, revision, scrubbed(f"the hub answered HTTP {status}{said}"))
    return HubError(repo, revision, scrubbed(f"cannot reach the hub: {type(exc).__name__}: {exc}"))

"""A local Hugging Face hub on 127.0.0.1, answering the HTTP API the way the real hub does: the
development cluster publishes its tiny model with it, and the tests their checkpoints and adapters.

It serves what ``huggingface_hub`` needs to resolve a revision and download files over plain HTTP:

* ``GET /api/models/{repo}/revision/{rev}[?blobs=true]``: ``sha`` and ``siblings`` (with ``size``,
  ``blobId`` and ``lfs: {sha256, size, pointerSize}`` when ``blobs`` is asked for);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the git blob sha1, or the
  sha256 for LFS files, quoted), ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Content-Length``,
  ``Accept-Ranges: bytes``; ``Range: bytes=a-[b]`` gets 206 with ``Content-Range``;
* errors with the hub's ``X-Error-Code``/``X-Error-Message``: 401 ``RepoNotFound`` for anonymous requests to
  private or missing repositories, 401 "Invalid credentials in Authorization header" for a bad token, 404
  ``RepoNotFound`` (authenticated), ``RevisionNotFound`` and ``EntryNotFound``.

LFS content is served directly rather than through a redirect to a CDN: the client reads the same
headers either way. No Xet headers are ever sent, so the client takes its plain HTTP path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()  # noqa: S324 - git's object id


@dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file git stores in place of the content."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()
        )

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.content)


@dataclass(frozen=True)
class Seen:
    """One request the server answered (or dropped)."""

    method: str
    path: str
    range: str | None
    token: str | None


@dataclass
class _Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branches and tags


class FakeHub:
    """``with FakeHub() as hub: hub.add_commit(...); ... endpoint=hub.endpoint``.

    With ``token`` set, every repository is private: anonymous requests get 401, other tokens are invalid.
    """

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.honor_range = True
        self._repos: dict[str, _Repo] = {}
        self._drops: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.seen: list[Seen] = []
        self.body_bytes: dict[tuple[str, str], int] = {}
        self._in_flight = 0
        self.max_in_flight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- state -----------------------------------------------------------------------------------------

    def add_commit(
        self, repo: str, files: dict[str, bytes], *, lfs: set[str] | None = None, branch: str = "main"
    ) -> str:
        """Add or replace ``files`` on top of ``branch`` (created if new); return the new commit sha.

        Without ``lfs``, files over 1 KiB and ``*.safetensors`` are stored in LFS, as the hub's default
        ``.gitattributes`` would; with it, exactly those paths are.
        """
        with self._lock:
            state = self._repos.setdefault(repo, _Repo())
            parent = state.refs.get(branch)
            tree = dict(state.commits[parent]) if parent else {}
            for path, content in files.items():
                is_lfs = (
                    path in lfs if lfs is not None else len(content) > LFS_THRESHOLD or path.endswith(".safetensors")
                )
                tree[path] = Blob(content, is_lfs)
            digest = hashlib.sha1(f"{repo}\0{parent}\0{len(state.commits)}".encode())  # noqa: S324 - a commit id
            for path in sorted(tree):
                digest.update(f"{path}\0{tree[path].etag}\0".encode())
            sha = digest.hexdigest()
            state.commits[sha] = tree
            state.refs[branch] = sha
            return sha

    def add_tag(self, repo: str, tag: str, sha: str) -> None:
        with self._lock:
            self._repos[repo].refs[tag] = sha

    def drop_after(self, repo: str, path: str, nbytes: int) -> None:
        """The next GET of ``path`` sends ``nbytes`` of its body, then the connection is closed."""
        with self._lock:
            self._drops[(repo, path)] = nbytes

    # -- counters ---------------------------------------------------------------------------------------

    def gets(self, repo: str, path: str) -> list[Seen]:
        """The GET requests for one file's content (any revision)."""
        pattern = re.compile(rf"/{re.escape(repo)}/resolve/[^/]+/{re.escape(path)}")
        with self._lock:
            return [s for s in self.seen if s.method == "GET" and pattern.fullmatch(s.path)]

    def ranges(self, repo: str, path: str) -> list[str]:
        return [s.range for s in self.gets(repo, path) if s.range is not None]

    # -- server -----------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "use FakeHub as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakehub", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        assert self._server is not None
        assert self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # -- request handling (server threads) -----------------------------------------------------------

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _lookup(self, repo: str, revision: str) -> tuple[_Repo | None, str | None, dict[str, Blob] | None]:
        with self._lock:
            state = self._repos.get(repo)
            if state is None:
                return None, None, None
            sha = state.refs.get(revision) or (revision if revision in state.commits else None)
            return state, sha, state.commits.get(sha) if sha else None

    def _take_drop(self, repo: str, path: str) -> int | None:
        with self._lock:
            return self._drops.pop((repo, path), None)

    def _sent(self, repo: str, path: str, n: int) -> None:
        with self._lock:
            self.body_bytes[(repo, path)] = self.body_bytes.get((repo, path), 0) + n

    @contextlib.contextmanager
    def _in_flight_download(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 30
    server: ThreadingHTTPServer

    @property
    def hub(self) -> FakeHub:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        return hub

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: failures show up in the tests' assertions

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        url = urlsplit(self.path)
        auth = self.headers.get("Authorization")
        token = auth.removeprefix("Bearer ") if auth else None
        self.hub._record(Seen(self.command, unquote(url.path), self.headers.get("Range"), token))
        try:
            self._check_token(token)
            if url.path.startswith("/api/models/"):
                self._revision_info(url.path, parse_qs(url.query), token=token, head=head)
            elif "/resolve/" in url.path:
                self._resolve(url.path, token=token, head=head)
            else:
                raise _Error(404, None, "Not Found")
        except _Error as err:
            headers = {**err.headers, "X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, headers, json.dumps({"error": err.message}).encode(), head=head)

    def _check_token(self, token: str | None) -> None:
        if token is not None and self.hub.token is not None and token != self.hub.token:
            raise _Error(401, None, "Invalid credentials in Authorization header")

    def _repo(self, repo: str, revision: str, token: str | None) -> tuple[str, dict[str, Blob]]:
        state, sha, tree = self.hub._lookup(repo, revision)
        private = self.hub.token is not None and token is None
        if state is None or private:
            # The hub does not tell a private repository from a missing one; anonymous callers get 401.
            raise _Error(401 if token is None else 404, "RepoNotFound", "Repository not found")
        if sha is None or tree is None:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, tree

    def _revision_info(self, path: str, query: dict[str, list[str]], *, token: str | None, head: bool) -> None:
        match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
        if match is None:
            raise _Error(404, None, "Not Found")
        repo, revision = unquote(match[1]), unquote(match[2] or "main")
        sha, tree = self._repo(repo, revision, token)
        blobs = query.get("blobs", ["false"])[0].lower() in ("true", "1")
        siblings = []
        for name in sorted(tree):
            blob = tree[name]
            entry: dict[str, object] = {"rfilename": name}
            if blobs:
                entry["size"] = len(blob.content)
                entry["blobId"] = git_blob_sha1(blob.pointer if blob.lfs else blob.content)
                if blob.lfs:
                    entry["lfs"] = {"sha256": blob.sha256, "size": len(blob.content), "pointerSize": len(blob.pointer)}
            siblings.append(entry)
        body = {
            "_id": uuid.uuid5(uuid.NAMESPACE_URL, repo).hex[:24],
            "id": repo,
            "modelId": repo,
            "private": self.hub.token is not None,
            "sha": sha,
            "siblings": siblings,
        }
        self._send(200, {"Content-Type": "application/json"}, json.dumps(body).encode(), head=head)

    def _resolve(self, path: str, *, token: str | None, head: bool) -> None:
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        revision, _, name = rest.partition("/")
        repo, revision, name = unquote(repo), unquote(revision), unquote(name)
        sha, tree = self._repo(repo, revision, token)
        blob = tree.get(name)
        if blob is None:
            raise _Error(404, "EntryNotFound", "Entry not found")
        size = len(blob.content)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(size)
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if wanted and self.hub.honor_range:
            match = _RANGE.fullmatch(wanted.strip())
            if match is None or int(match[1]) >= size:
                raise _Error(416, None, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
            start, end, status = int(match[1]), min(int(match[2] or size - 1), size - 1), 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = blob.content[start : end + 1]
        if head:
            self._send(status, headers, body, head=True)
            return
        with self.hub._in_flight_download():
            drop = self.hub._take_drop(repo, name)
            if drop is None:
                self._send(status, headers, body, head=False)
                self.hub._sent(repo, name, len(body))
                return
            # Promise the whole body, send part of it, hang up: the client sees a connection lost mid-file.
            self._send_headers(status, headers, len(body))
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.hub._sent(repo, name, min(drop, len(body)))
            self.close_connection = True

    def _send(self, status: int, headers: dict[str, str], body: bytes, *, head: bool) -> None:
        self._send_headers(status, headers, len(body))
        if not head:
            self.wfile.write(body)

    def _send_headers(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(length), "X-Request-Id": uuid.uuid4().hex}.items():
            self.send_header(key, value)
        self.end_headers()

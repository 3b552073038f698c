"""One container's process for the local pod runner, and the records that let a later run stop what
a killed run left behind.

Each process runs in a session (and so a process group) of its own. When its leader exits, what is
left of its group is killed before the leader is reaped, as a container's processes end with its
PID 1; while the leader is unreaped its PID cannot be reused, so no signal ever reaches a stranger.

Every started process is recorded in ``<cluster>/pod-processes/<pid>.json`` with its start time
(field 22 of ``/proc/<pid>/stat``, as ``cluster.py`` records the control plane) and a marker that
its environment carries (``KIMI_POD_PROCESS``, inherited by its children); the record goes when the
process is reaped. ``stop_leftovers`` stops the processes of records a killed runner left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

from kimi_operator.devcluster import podprotocol
from kimi_operator.devcluster.podplan import ContainerPlan
from kimi_operator.devcluster.podprotocol import Result

log = logging.getLogger(__name__)

MARKER_VARIABLE = "KIMI_POD_PROCESS"
START_ERROR_CODE = 128  # what a runtime reports for a container that could not start
LOG_TAIL_BYTES = 64 * 1024
POLL = 0.05


def records_dir(cluster_dir: Path) -> Path:
    return cluster_dir / "pod-processes"


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), or None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _tail(path: Path, size: int, start: int = 0) -> bytes:
    """The last ``size`` bytes of the file, none before offset ``start``."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(start, end - size))
            return f.read()
    except OSError:
        return b""


class Process:
    """One container's process: started (again) by ``start``, stopped by ``stop``."""

    def __init__(self, container: ContainerPlan, cluster_dir: Path) -> None:
        self.container = container
        self.records = records_dir(cluster_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_error = ""
        self.started_at = 0.0  # time.monotonic() of the last start
        self.starts = 0  # how many times it was started (a kubelet's restartCount is one less)
        self._log_offset = 0
        self._record: Path | None = None
        self._lock = threading.Lock()  # poll (which reaps) and signal exclude each other
        self._kill_at = math.inf
        self._hurried = threading.Event()

    def start(self) -> None:
        """Start the process: its termination-message file empty, its output appended to its log."""
        with self._lock:
            self.proc, self.start_error, self._kill_at = None, "", math.inf
        self._hurried.clear()
        self.started_at = time.monotonic()
        self.starts += 1
        container = self.container
        container.termination_file.parent.mkdir(parents=True, exist_ok=True)
        container.termination_file.write_bytes(b"")
        container.log.parent.mkdir(parents=True, exist_ok=True)
        marker = secrets.token_hex(8)
        with container.log.open("ab") as out:
            self._log_offset = out.seek(0, os.SEEK_END)
            try:
                proc = subprocess.Popen(
                    list(container.argv),
                    env={**container.env, MARKER_VARIABLE: marker},
                    cwd=container.cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                self.start_error = f"failed to start {container.argv[0]}: {exc}"
                out.write(f"{self.start_error}\n".encode())
                return
        self._record = self._write_record(proc.pid, marker)
        with self._lock:
            self.proc = proc

    def _write_record(self, pid: int, marker: str) -> Path:
        self.records.mkdir(parents=True, exist_ok=True)
        path = self.records / f"{pid}.json"
        record = {"pid": pid, "started": start_time(pid), "marker": marker, "argv0": self.container.argv[0]}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
        return path

    def poll(self) -> int | None:
        """The exit status once the process has exited (START_ERROR_CODE if it never started)."""
        with self._lock:
            proc = self.proc
            if proc is None:
                return START_ERROR_CODE
            if proc.returncode is not None:
                return proc.returncode
            try:
                exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped elsewhere: its group is no longer ours to signal
                returncode = proc.poll()
            else:
                if exited is None:
                    return None
                # Exited but not yet reaped: its PID, and so its group, is still ours.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                returncode = proc.wait()
            if returncode is not None and self._record is not None:
                self._record.unlink(missing_ok=True)
                self._record = None
            return returncode

    def result(self) -> Result:
        """(exit code, reason, termination message) once it has exited."""
        returncode = self.poll()
        assert returncode is not None
        if self.proc is None:
            return START_ERROR_CODE, "StartError", self.start_error
        code, reason = podprotocol.exit_status(returncode)
        message = podprotocol.termination_message(
            _tail(self.container.termination_file, podprotocol.MAX_MESSAGE_BYTES),
            _tail(self.container.log, LOG_TAIL_BYTES, self._log_offset),
            code,
            self.container.fallback_to_logs,
        )
        return code, reason, message

    def signal(self, signum: int) -> None:
        """Signal the process's group, only while its leader is unreaped."""
        with self._lock:
            if self.proc is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signum)

    def hurry(self, kill_at: float) -> None:
        """Bring a stop's SIGKILL forward to ``kill_at`` (time.monotonic()), never back."""
        with self._lock:
            self._kill_at = min(self._kill_at, kill_at)
        self._hurried.set()

    def stop(self, kill_at: float) -> None:
        """SIGTERM to the group, SIGKILL at ``kill_at`` (or earlier, see ``hurry``); returns once the
        process has ended."""
        self.hurry(kill_at)
        if self.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        while self.poll() is None:
            remaining = self._kill_at - time.monotonic()
            if remaining <= 0:
                self.signal(signal.SIGKILL)
                time.sleep(POLL)
                continue
            self._hurried.wait(min(remaining, POLL))
            self._hurried.clear()


# -- leftovers of a killed runner --------------------------------------------------------------------


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def leftovers(cluster_dir: Path) -> list[int]:
    """PIDs of the recorded processes still running: each recorded leader (same start time) and
    every process whose environment carries a recorded marker (its children)."""
    markers: set[bytes] = set()
    found: set[int] = set()
    for path in sorted(records_dir(cluster_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        markers.add(f"{MARKER_VARIABLE}={record['marker']}".encode())
        if record.get("started") and start_time(int(record["pid"])) == record["started"]:
            found.add(int(record["pid"]))
    if markers:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and any(_environ_has(int(entry.name), m) for m in markers):
                found.add(int(entry.name))
    found.discard(os.getpid())
    return sorted(pid for pid in found if start_time(pid) is not None)


def stop_leftovers(cluster_dir: Path, grace: float = 5.0) -> list[int]:
    """Stop what a killed runner left of its pods' processes (SIGTERM, SIGKILL after ``grace``
    seconds) and drop its records; the PIDs found."""
    pids = leftovers(cluster_dir)
    started = {pid: start_time(pid) for pid in pids}

    def same(pid: int) -> bool:
        return started[pid] is not None and start_time(pid) == started[pid]

    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            if same(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while any(same(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(POLL)
    for pid in pids:
        # Our own children (a runner stopped in this process) are reaped here.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    for path in records_dir(cluster_dir).glob("*.json"):
        path.unlink(missing_ok=True)
    if pids:
        log.info("stopped %d leftover pod process(es) in %s", len(pids), cluster_dir)
    return pids

"""Start, inspect and stop the local control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and KWOK, all bound to 127.0.0.1, with simulated GPU nodes.

Every process is started here, recorded with its PID and start time in ``cluster.json``, and
stopped by that PID only (the start time guards against a reused PID).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kimi_operator.devcluster import build, nodes, podprocess
from kimi_operator.devcluster.certs import Authority, service_account_keys
from kimi_operator.devcluster.paths import repo_root, state_root

# Pod IPs come from a loopback range so that anything a test dials stays on this machine.
POD_CIDR = "127.64.0.0/16"
# Cluster IPs are allocated by the apiserver but never dialled: nothing here connects to a Service IP.
SERVICE_CIDR = "10.96.0.0/16"
START_TIMEOUT = 90.0


class ClusterError(RuntimeError):
    """The cluster could not be brought to the requested state; the message says where to look."""


@dataclasses.dataclass
class Layout:
    """Files of one cluster directory."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state_file(self) -> Path:
        return self.root / "cluster.json"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    def component_kubeconfig(self, name: str) -> Path:
        return self.root / f"{name}.kubeconfig"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A PID with its start time names one process: the control plane's are recorded as the pods' are.
_start_time = podprocess.start_time


def alive(record: Mapping[str, Any]) -> bool:
    return _start_time(int(record["pid"])) == record.get("started")


def _load_state(layout: Layout) -> dict[str, Any]:
    if layout.state_file.exists():
        data: dict[str, Any] = json.loads(layout.state_file.read_text())
        return data
    return {"ports": {}, "processes": {}}


def _save_state(layout: Layout, state: Mapping[str, Any]) -> None:
    tmp = layout.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.rename(layout.state_file)


def _write_kubeconfig(path: Path, server: str, *, ca: Path, cert: Path, key: Path, user: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kimi-dev", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "kimi-dev", "context": {"cluster": "kimi-dev", "user": user}}],
        "current-context": "kimi-dev",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)


def _probe(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:  # noqa: S310 (loopback URL built here)
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait(what: str, check: Callable[[], bool], deadline: float, log: Path | None) -> None:
    """Poll a readiness check until it holds; fail with the component's log tail on timeout."""
    while not check():
        if time.monotonic() > deadline:
            tail = ""
            if log and log.exists():
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise ClusterError(f"{what} did not become ready in time; last log lines:\n{tail}")
        time.sleep(0.2)


class Cluster:
    """One local control plane, rooted at a state directory."""

    def __init__(self, root: Path | None = None, node_file: Path | None = None) -> None:
        self.layout = Layout(root or state_root())
        self.node_file = node_file or repo_root() / "e2e" / "cluster" / "nodes.yaml"
        self.stages_file = repo_root() / "e2e" / "cluster" / "kwok-stages.yaml"

    # -- state -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return _load_state(self.layout)

    def running(self) -> dict[str, bool]:
        return {name: alive(rec) for name, rec in self.state()["processes"].items()}

    def server(self) -> str:
        port = self.state()["ports"].get("apiserver")
        if port is None:
            raise ClusterError(f"no cluster in {self.layout.root}; run `kimi-operator dev-cluster up`")
        return f"https://127.0.0.1:{port}"

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        # A discovery cache of this cluster's own: ports are reused by later clusters.
        cache = str(self.layout.root / "kubectl-cache")
        common = ("--kubeconfig", str(self.layout.kubeconfig), "--cache-dir", cache)
        return self.tool("kubectl", *common, *args, input_text=input_text, check=check)

    def tool(self, name: str, *args: str, input_text: str | None = None, check: bool = True) -> str:
        """Run one of the built tools (kubectl, helm) and return its standard output."""
        proc = subprocess.run(
            [str(build.binary(name)), *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"{name} {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    # -- up ----------------------------------------------------------------------------------

    def up(self, crd_dir: Path | None = None) -> None:
        """Bring every component up; components already running are left alone (idempotent)."""
        started = time.monotonic()
        bins = build.binaries()
        layout = self.layout
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.logs.mkdir(exist_ok=True)
        state = _load_state(layout)
        ports: dict[str, int] = state["ports"]
        procs: dict[str, dict[str, Any]] = state["processes"]
        for name in ("etcd-client", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"):
            if name not in ports:
                ports[name] = _free_port()
        _save_state(layout, state)

        pki = self._certificates()
        ca_ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        ca_ctx.load_cert_chain(str(pki["admin.crt"]), str(pki["admin.key"]))
        server = f"https://127.0.0.1:{ports['apiserver']}"
        for user in ("admin", "controller-manager", "scheduler", "kwok"):
            path = layout.kubeconfig if user == "admin" else layout.component_kubeconfig(user)
            _write_kubeconfig(path, server, ca=pki["ca"], cert=pki[f"{user}.crt"], key=pki[f"{user}.key"], user=user)

        deadline = time.monotonic() + START_TIMEOUT
        etcd_url = f"http://127.0.0.1:{ports['etcd-client']}"
        self._ensure(procs, "etcd", self._etcd_cmd(bins["etcd"], ports), state)
        _wait("etcd", lambda: _probe(f"{etcd_url}/health", None), deadline, layout.logs / "etcd.log")

        self._ensure(procs, "kube-apiserver", self._apiserver_cmd(bins["kube-apiserver"], ports, pki), state)
        _wait(
            "kube-apiserver",
            lambda: _probe(f"{server}/readyz", ca_ctx),
            deadline,
            layout.logs / "kube-apiserver.log",
        )
        if crd_dir is not None:
            # The garbage collector discovers kinds at start; install CRDs before the controller-manager.
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd_dir))
            self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
            groups = self._crd_groups(crd_dir)
            _wait(
                "discovery of the installed CRDs",
                lambda: all(self._discoverable(g) for g in groups),
                deadline,
                layout.logs / "kube-apiserver.log",
            )
            # Discovery read before the CRDs existed is stale now.
            shutil.rmtree(layout.root / "kubectl-cache", ignore_errors=True)

        self._ensure(
            procs,
            "kube-controller-manager",
            self._controller_manager_cmd(bins["kube-controller-manager"], ports, pki),
            state,
        )
        self._ensure(procs, "kube-scheduler", self._scheduler_cmd(bins["kube-scheduler"], ports, pki), state)
        self._ensure(procs, "kwok", self._kwok_cmd(bins["kwok"], ports), state)
        for name, key in (("kube-controller-manager", "controller-manager"), ("kube-scheduler", "scheduler")):
            url = f"https://127.0.0.1:{ports[key]}/healthz"
            _wait(name, functools.partial(_probe, url, ca_ctx), deadline, layout.logs / f"{name}.log")

        node_list = nodes.render(self.node_file)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input_text=node_list)
        names = [n["metadata"]["name"] for n in json.loads(node_list)["items"]]
        _wait("simulated nodes", lambda: self._nodes_ready(names), deadline, layout.logs / "kwok.log")
        # Pods can only be created once the ServiceAccount controller made the default account.
        _wait(
            "default ServiceAccount",
            lambda: bool(self.kubectl("get", "serviceaccount", "default", "-n", "default", "-o", "name", check=False)),
            deadline,
            layout.logs / "kube-controller-manager.log",
        )
        print(f"cluster up in {time.monotonic() - started:.1f}s: {server}", file=sys.stderr)

    def _crd_groups(self, crd_dir: Path) -> set[str]:
        out = self.kubectl("get", "-f", str(crd_dir), "-o", "jsonpath={range .items[*]}{.spec.group}{'\\n'}{end}")
        return {line for line in out.splitlines() if line}

    def _discoverable(self, group: str) -> bool:
        out = self.kubectl("api-resources", f"--api-group={group}", "-o", "name", "--cached=false", check=False)
        return bool(out.strip())

    def _nodes_ready(self, names: Sequence[str]) -> bool:
        out = self.kubectl(
            "get",
            "nodes",
            "-o",
            'jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
            check=False,
        )
        ready = {line.split("=", 1)[0] for line in out.splitlines() if line.endswith("=True")}
        return set(names) <= ready

    def _certificates(self) -> dict[str, Path]:
        ca = Authority(self.layout.pki)
        ca.ensure()
        paths: dict[str, Path] = {"ca": ca.cert_path}
        issued = {
            "apiserver": ca.issue(
                "apiserver",
                "kube-apiserver",
                server=True,
                dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
                ips=("127.0.0.1",),
            ),
            "controller-manager-serving": ca.issue(
                "controller-manager-serving",
                "kube-controller-manager",
                server=True,
                dns=("localhost",),
                ips=("127.0.0.1",),
            ),
            "scheduler-serving": ca.issue(
                "scheduler-serving", "kube-scheduler", server=True, dns=("localhost",), ips=("127.0.0.1",)
            ),
            "admin": ca.issue("admin", "kimi-operator-admin", "system:masters", client=True),
            "controller-manager": ca.issue("controller-manager", "system:kube-controller-manager", client=True),
            "scheduler": ca.issue("scheduler", "system:kube-scheduler", client=True),
            # KWOK writes node and pod status for many nodes; it acts as a cluster administrator.
            "kwok": ca.issue("kwok", "kwok-controller", "system:masters", client=True),
        }
        for name, (crt, key) in issued.items():
            paths[f"{name}.crt"], paths[f"{name}.key"] = crt, key
        paths["sa.key"], paths["sa.pub"] = service_account_keys(self.layout.pki)
        return paths

    def _ensure(self, procs: dict[str, dict[str, Any]], name: str, cmd: list[str], state: dict[str, Any]) -> None:
        record = procs.get(name)
        if record and alive(record):
            return
        log = (self.layout.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal must not reach the cluster directly
            cwd=self.layout.root,
        )
        log.close()
        started = None
        while started is None and proc.poll() is None:
            started = _start_time(proc.pid)
        if started is None:
            raise ClusterError(f"{name} exited at once; see {self.layout.logs / f'{name}.log'}")
        procs[name] = {"pid": proc.pid, "started": started, "cmd": cmd[0]}
        _save_state(self.layout, state)

    def _etcd_cmd(self, binary: Path, ports: Mapping[str, int]) -> list[str]:
        client, peer = f"http://127.0.0.1:{ports['etcd-client']}", f"http://127.0.0.1:{ports['etcd-peer']}"
        return [
            str(binary),
            "--name=kimi-dev",
            f"--data-dir={self.layout.root / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kimi-dev={peer}",
            # Throwaway data on a small machine: skip fsync, keep the database small.
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=2147483648",
            "--log-level=warn",
        ]

    def _apiserver_cmd(self, binary: Path, ports: Mapping[str, int], pki: Mapping[str, Path]) -> list[str]:
        port = ports["apiserver"]
        return [
            str(binary),
            f"--etcd-servers=http://127.0.0.1:{ports['etcd-client']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # With a loopback advertise address the apiserver must not publish endpoints for the
            # `kubernetes` Service: nothing may dial it anyway.
            "--endpoint-reconciler-type=none",
            f"--secure-port={port}",
            f"--tls-cert-file={pki['apiserver.crt']}",
            f"--tls-private-key-file={pki['apiserver.key']}",
            f"--client-ca-file={pki['ca']}",
            f"--service-account-issuer=https://127.0.0.1:{port}",
            f"--service-account-key-file={pki['sa.pub']}",
            f"--service-account-signing-key-file={pki['sa.key']}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_cmd(self, binary: Path, ports: Mapping[str, int], pki: Mapping[str, Path]) -> list[str]:
        kubeconfig = self.layout.component_kubeconfig("controller-manager")
        return [
            str(binary),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller-manager']}",
            f"--tls-cert-file={pki['controller-manager-serving.crt']}",
            f"--tls-private-key-file={pki['controller-manager-serving.key']}",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki['sa.key']}",
            f"--root-ca-file={pki['ca']}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cluster-signing-cert-file={pki['ca']}",
            f"--cluster-signing-key-file={self.layout.pki / 'ca.key'}",
            "--profiling=false",
            "--v=1",
        ]

    def _scheduler_cmd(self, binary: Path, ports: Mapping[str, int], pki: Mapping[str, Path]) -> list[str]:
        kubeconfig = self.layout.component_kubeconfig("scheduler")
        return [
            str(binary),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            f"--tls-cert-file={pki['scheduler-serving.crt']}",
            f"--tls-private-key-file={pki['scheduler-serving.key']}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]

    def _kwok_cmd(self, binary: Path, ports: Mapping[str, int]) -> list[str]:
        return [
            str(binary),
            f"--kubeconfig={self.layout.component_kubeconfig('kwok')}",
            f"--config={self.stages_file}",
            f"--manage-nodes-with-annotation-selector={nodes.KWOK_NODE_ANNOTATION}=fake",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{ports['kwok']}",
        ]

    # -- down --------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop the processes this directory started (by PID), then remove the directory."""
        # Pod programs a local pod runner started and left behind (a runner killed mid-run).
        podprocess.stop_leftovers(self.layout.root)
        state = self.state()
        stopped = []
        # Reverse start order: fake kubelets and controllers first, etcd last.
        for name, record in reversed(list(state["processes"].items())):
            if _stop(record):
                stopped.append(name)
        if self.layout.root.exists():
            _remove_tree(self.layout.root)
        return stopped

    def stray_processes(self) -> list[tuple[int, str]]:
        """Processes whose command line names this cluster's directory (none after ``down``)."""
        marker = str(self.layout.root)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # Arguments of the control plane's own binaries, not a shell line that merely mentions the path.
            if argv and argv[0] and not argv[0].endswith((b"sh", b"make")) and any(marker.encode() in a for a in argv):
                found.append((int(entry.name), b" ".join(argv).decode(errors="replace")[:200]))
        return found

    def env(self) -> str:
        kubectl_dir = build.binary("kubectl").parent
        return f"export KUBECONFIG={self.layout.kubeconfig}\nexport PATH={kubectl_dir}:$PATH\n"


def _stop(record: Mapping[str, Any], grace: float = 15.0) -> bool:
    pid = int(record["pid"])
    if not alive(record):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(record):
        os.kill(pid, signal.SIGKILL)
        while alive(record):
            time.sleep(0.05)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our child (``up`` and ``down`` in one process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _remove_tree(root: Path) -> None:
    shutil.rmtree(root)

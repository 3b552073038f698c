import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_operator.devcluster import build, cluster, nodes
from kimi_operator.devcluster.paths import repo_root

GO_MOD = """module k8s.io/kubernetes

require (
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/cri-streaming => ./staging/src/k8s.io/cri-streaming
\tgithub.com/other/mod => github.com/fork/mod v1.0.0
)
"""


def test_staging_replaces_come_from_the_release_go_mod() -> None:
    assert build.staging_replaces(GO_MOD, "v1.37.2") == [
        ("k8s.io/api", "v0.37.2"),
        ("k8s.io/client-go", "v0.37.2"),
        ("k8s.io/cri-streaming", "v0.37.2"),
    ]


def test_staging_replaces_refuse_odd_versions_and_empty_lists() -> None:
    with pytest.raises(build.BuildError, match="unsupported Kubernetes version"):
        build.staging_replaces(GO_MOD, "v2.0")
    with pytest.raises(build.BuildError, match="no staging replace lines"):
        build.staging_replaces("module x\n", "v1.37.2")


def test_version_ldflags_report_the_release() -> None:
    flags = build.version_ldflags("k8s.io/kubernetes", "v1.37.2")
    assert "-X k8s.io/component-base/version.gitVersion=v1.37.2" in flags
    assert "-X k8s.io/client-go/pkg/version.gitMinor=37" in flags
    assert build.version_ldflags("sigs.k8s.io/kwok", "v0.8.0") == []
    assert build.version_ldflags("helm.sh/helm/v3", "v3.22.0") == [
        "-X helm.sh/helm/v3/internal/version.version=v3.22.0"
    ]


def test_tools_modules_pin_one_release_each() -> None:
    pins = {c.name: c.requirement() for c in build.COMPONENTS}
    assert pins["kubernetes"][0] == "k8s.io/kubernetes"
    assert pins["etcd"][1].startswith("v3.6.")
    assert {c.name: c.binaries() for c in build.COMPONENTS}["etcd"] == ("server",)


def test_cache_key_follows_the_module_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "e2e" / "tools" / "demo"
    source.mkdir(parents=True)
    (source / "go.mod").write_text("module demo\n\nrequire example.com/tool v1.2.3\n")
    monkeypatch.setattr(build, "repo_root", lambda: tmp_path)
    component = build.Component("demo", ("example.com/tool/cmd/tool",))
    first = build.cache_key(component, "go1.26.8")
    assert first.startswith("demo-v1.2.3-")
    assert build.cache_key(component, "go1.27.3") != first
    (source / "go.mod").write_text("module demo\n\nrequire example.com/tool v1.2.4\n")
    assert build.cache_key(component, "go1.26.8").startswith("demo-v1.2.4-")
    # A command of our own in a subdirectory is part of the content too.
    (source / "cmd").mkdir()
    (source / "cmd" / "main.go").write_text("package main\n")
    with_command = build.cache_key(component, "go1.26.8")
    (source / "cmd" / "main.go").write_text("package main\n\nfunc main() {}\n")
    assert build.cache_key(component, "go1.26.8") != with_command
    assert {c.name: c.binaries() for c in build.COMPONENTS}["lua"] == ("luahealth",)


def test_node_profiles_render_gpu_nodes() -> None:
    node_list = nodes.render(repo_root() / "e2e" / "cluster" / "nodes.yaml")

    items = {n["metadata"]["name"]: n for n in json.loads(node_list)["items"]}
    rtx = items["gpu-4090-a"]
    assert rtx["status"]["capacity"]["nvidia.com/gpu"] == "2"
    assert rtx["status"]["capacity"]["memory"] == "1Ti"
    assert rtx["metadata"]["labels"]["feature.node.kubernetes.io/cpu-cpuid.AMXINT8"] == "true"
    assert rtx["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    h200 = items["gpu-h200-a"]
    assert h200["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert h200["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    addresses = [a["address"] for n in items.values() for a in n["status"]["addresses"] if a["type"] == "InternalIP"]
    assert all(a.startswith("127.") for a in addresses)
    assert len(set(addresses)) == len(addresses)


def test_node_profile_errors_name_the_file_and_entry(tmp_path: Path) -> None:
    bad = tmp_path / "nodes.yaml"
    bad.write_text("profiles: {}\nnodes:\n  - {name: n1, profile: missing}\n")
    with pytest.raises(nodes.ProfileError, match=r"nodes\.yaml: nodes\[0\] \(n1\) names unknown profile 'missing'"):
        nodes.render(bad)
    bad.write_text("profiles:\n  p: {capacity: {cpu: 1}}\nnodes:\n  - {name: n1, profile: p}\n")
    missing = re.escape("lacks capacity memory, pods, ephemeral-storage, nvidia.com/gpu")
    with pytest.raises(nodes.ProfileError, match=missing):
        nodes.render(bad)


def test_liveness_follows_pid_and_start_time() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        started = cluster._start_time(proc.pid)
        assert started is not None
        record = {"pid": proc.pid, "started": started}
        assert cluster.alive(record)
        # Same PID with another start time is another process: never ours to stop.
        assert not cluster.alive({"pid": proc.pid, "started": "0"})
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    assert not cluster.alive(record)


def test_stop_ends_only_the_recorded_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    record = {"pid": proc.pid, "started": cluster._start_time(proc.pid)}
    assert cluster._stop(record)
    assert cluster._start_time(proc.pid) is None
    # A second stop finds nothing of ours to end.
    assert not cluster._stop(record)


def test_stray_processes_are_found_by_their_cluster_directory(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()", f"--data-dir={root}/etcd"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        # Until the child has exec'd, its command line is still the test runner's.
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        stray = cluster.Cluster(root).stray_processes()
        assert [pid for pid, _ in stray] == [proc.pid]
        assert cluster.Cluster(tmp_path / "other").stray_processes() == []
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    assert cluster.Cluster(root).stray_processes() == []

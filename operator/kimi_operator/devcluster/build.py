"""Compile the local control plane from the Go module proxy into a cache outside the checkout.

Each component is a tools module under ``e2e/tools/<name>`` that requires one pinned release. The
build copies the module into a cache directory keyed by the module's content and the Go version,
so a second start finds the binaries and builds nothing. Only the standard library is used here:
this runs before the project's virtual environment exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kimi_operator.devcluster.paths import cache_root, repo_root

KUBERNETES_MODULE = "k8s.io/kubernetes"
_STAGING_REPLACE = re.compile(r"^\s*(k8s\.io/[A-Za-z0-9._-]+)\s+=>\s+\./staging/src/\1\s*$", re.M)
_REQUIRE = re.compile(r"^require\s+(\S+)\s+(v\S+)\s*$", re.M)


@dataclasses.dataclass(frozen=True)
class Component:
    """One tools module and the commands it yields."""

    name: str
    packages: tuple[str, ...]

    @property
    def source(self) -> Path:
        return repo_root() / "e2e" / "tools" / self.name

    def requirement(self) -> tuple[str, str]:
        """The single (module, version) the tools module pins; go.mod is the one source of it."""
        text = (self.source / "go.mod").read_text()
        match = _REQUIRE.search(text)
        if match is None:
            raise BuildError(f"{self.source / 'go.mod'}: no single-line 'require <module> <version>'")
        return match.group(1), match.group(2)

    def binaries(self) -> tuple[str, ...]:
        """Names `go build -o dir/` gives: the last path element, skipping a major-version suffix."""
        names = []
        for package in self.packages:
            parts = package.rstrip("/").split("/")
            names.append(parts[-2] if re.fullmatch(r"v\d+", parts[-1]) else parts[-1])
        return tuple(names)


COMPONENTS: tuple[Component, ...] = (
    Component("etcd", ("go.etcd.io/etcd/server/v3",)),
    Component("kwok", ("sigs.k8s.io/kwok/cmd/kwok",)),
    Component("helm", ("helm.sh/helm/v3/cmd/helm",)),
    # Our own command in that module: Argo CD's Lua VM, to test the chart's health check.
    Component("lua", ("./luahealth",)),
    Component(
        "kubernetes",
        (
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            "k8s.io/kubernetes/cmd/kubectl",
        ),
    ),
)

# etcd's main package is its module root, go.etcd.io/etcd/server/v3, which `go build` names "server".
_BINARY_RENAMES = {"server": "etcd"}


class BuildError(RuntimeError):
    """A build step failed; the message says which command and why."""


def go_version() -> str:
    out = subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def cache_key(component: Component, go: str) -> str:
    digest = hashlib.sha256(go.encode())
    # Every file of the module, our own commands in subdirectories included.
    for path in sorted(p for p in component.source.rglob("*") if p.is_file()):
        digest.update(path.relative_to(component.source).as_posix().encode())
        digest.update(path.read_bytes())
    _, version = component.requirement()
    return f"{component.name}-{version}-{digest.hexdigest()[:12]}"


def bin_dir(component: Component, go: str | None = None) -> Path:
    return cache_root() / "controlplane" / cache_key(component, go or go_version()) / "bin"


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"GOWORK": "off", "GOFLAGS": "-mod=mod -buildvcs=false", "CGO_ENABLED": "0"})
    return env


def _run(cmd: Sequence[str], cwd: Path, log: Path) -> str:
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(list(cmd), cwd=cwd, env=_go_env(), capture_output=True, text=True, check=False)
        fh.write(proc.stdout)
        fh.write(proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise BuildError(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def staging_replaces(kubernetes_go_mod: str, version: str) -> list[tuple[str, str]]:
    """Map each staging module of k8s.io/kubernetes to its published v0.<minor>.<patch> release."""
    match = re.fullmatch(r"v1\.(\d+)\.(\d+)", version)
    if match is None:
        raise BuildError(f"unsupported Kubernetes version {version!r}: expected v1.<minor>.<patch>")
    staging_version = f"v0.{match.group(1)}.{match.group(2)}"
    modules = sorted(set(_STAGING_REPLACE.findall(kubernetes_go_mod)))
    if not modules:
        raise BuildError("no staging replace lines found in k8s.io/kubernetes go.mod")
    return [(m, staging_version) for m in modules]


def version_ldflags(module: str, version: str) -> list[str]:
    if module == "helm.sh/helm/v3":
        return [f"-X helm.sh/helm/v3/internal/version.version={version}"]
    if module != KUBERNETES_MODULE:
        return []
    major, minor = version.lstrip("v").split(".")[:2]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        for key, value in (
            ("gitVersion", version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
            ("buildDate", stamp),
        ):
            flags.append(f"-X {pkg}.{key}={value}")
    return flags


def build(component: Component, log: Path) -> Path:
    """Build one component unless the cache already holds it; return its bin directory."""
    go = go_version()
    target = bin_dir(component, go)
    if all((target / b).exists() for b in final_names(component)):
        return target
    work = target.parent / "src"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(component.source, work)
    module, version = component.requirement()
    if module == KUBERNETES_MODULE:
        info = json.loads(_run(["go", "mod", "download", "-json", f"{module}@{version}"], work, log))
        upstream = Path(info["GoMod"]).read_text()
        args = [f"-replace={m}={m}@{v}" for m, v in staging_replaces(upstream, version)]
        _run(["go", "mod", "edit", *args], work, log)
    _run(["go", "mod", "tidy"], work, log)
    staging = target.parent / "bin.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    ldflags = " ".join(["-s", "-w", *version_ldflags(module, version)])
    _run(
        ["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(staging) + "/", *component.packages],
        work,
        log,
    )
    for old, new in _BINARY_RENAMES.items():
        if (staging / old).exists():
            (staging / old).rename(staging / new)
    # Rename the whole directory at the end so an interrupted build is never taken as complete.
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def final_names(component: Component) -> tuple[str, ...]:
    return tuple(_BINARY_RENAMES.get(b, b) for b in component.binaries())


def binary(name: str) -> Path:
    """Where the cache keeps one binary (built or not)."""
    for component in COMPONENTS:
        if name in final_names(component):
            return bin_dir(component) / name
    raise KeyError(name)


def binaries() -> dict[str, Path]:
    """Path of every control-plane binary, building what the cache lacks."""
    log_dir = cache_root() / "controlplane" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for component in COMPONENTS:
        log = log_dir / f"{component.name}.log"
        started = time.monotonic()
        target = bin_dir(component)
        cached = all((target / b).exists() for b in final_names(component))
        if not cached:
            print(f"building {component.name} {component.requirement()[1]} (log: {log})", file=sys.stderr)
        target = build(component, log)
        if not cached:
            print(f"built {component.name} in {time.monotonic() - started:.0f}s", file=sys.stderr)
        for name in final_names(component):
            found[name] = target / name
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    try:
        for name, path in binaries().items():
            print(f"{name}\t{path}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

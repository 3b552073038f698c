"""What a kubelet would run for one pod of a simulated node, computed without any I/O.

``plan`` turns a pod (the API object as a dict), the runner's configuration and the objects the pod
refers to (already read) into a :class:`Plan`: the directories and files its volumes need on this
machine, and for each init container, then each container, the local argv, environment, working
directory, log file and termination-message file. ``runner`` does the I/O.

Kubernetes rules followed (kubelet ``kuberuntime`` / ``envvars``, ``third_party/forked/golang/expansion``):

- argv: ``command`` replaces the image's ENTRYPOINT, ``args`` its CMD (CMD is dropped when only
  ``command`` is given); ``$(VAR)`` in command and args expands from the container's environment,
  ``$$`` is a literal ``$``, an unknown ``$(VAR)`` stays as written.
- env: as ``podenv`` computes it.
- the image's program: a local process cannot run the image, so each image maps argv prefixes
  (``["kimi-operator"]``, ``["python", "-m", "sglang.launch_server"]``, ``["llama-server"]``) to a
  local argv prefix; the longest matching prefix wins.
- volumes: hostPath -> ``<cluster>/nodes/<node>/<path>``; persistentVolumeClaim ->
  ``<cluster>/claims/<namespace>/<claim>`` (one directory every node sees, like ReadWriteMany);
  emptyDir, configMap, secret, downwardAPI and projected -> a directory of the pod. A process cannot
  mount, so each mount path (and the termination-message path) is rewritten to its local path in
  args, env values and the working directory, at the start of a value, after ``=`` or after ``,``.
  A missing subPath directory is created, and a hostPath ``FileOrCreate`` file. A directory that
  holds mounts without being one (``/keys`` above ``/keys/<secret>``) becomes a directory of the
  container with a link for each mount in it; a value naming exactly that directory is rewritten.
- volume updates: the files of configMap, secret and projected volumes are written again when their
  source changes (``refreshed``), as a kubelet does, except where a container mounts them by subPath.
- binding: an argument or env value that would bind every interface (``0.0.0.0``, ``::``, alone or
  as a ``--host=`` value) is refused: all test traffic stays on 127.0.0.0/8.
- file modes: a volume's files take the item's mode, else the volume's ``defaultMode``, else 0644
  as the kubelet does; the pod's directory is 0700 so that other local users cannot read them.
- the ServiceAccount: a container that mounts ``/var/run/secrets/kubernetes.io/serviceaccount``
  gets ``KUBECONFIG`` naming a kubeconfig that reads that volume's token file (the workloads fall
  back from in-cluster config to the kubeconfig, ``kimi_operator/kubeconfig.py``). No
  ``KUBERNETES_SERVICE_*`` variables are set, so in-cluster config is never attempted.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from kimi_operator.devcluster.podenv import (
    MissingReference,
    PlanError,
    References,
    container_env,
    expand,
    field_value,
    resource_field,
)
from kimi_operator.devcluster.podprotocol import job_owned

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
DEFAULT_FILE_MODE = 0o644  # the kubelet's default for configMap, secret, downwardAPI and projected files
# Values that would bind every interface; the pods must stay on their 127.x address.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]"})  # noqa: S104 (the addresses refused)


@dataclasses.dataclass(frozen=True)
class Image:
    """How one image's programs run on this machine."""

    # argv prefix inside the image -> argv prefix here; the longest match wins.
    programs: Mapping[tuple[str, ...], tuple[str, ...]]
    entrypoint: tuple[str, ...] = ()  # the image's ENTRYPOINT
    cmd: tuple[str, ...] = ()  # the image's CMD
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the image's ENV, as needed here


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    cluster_dir: Path
    images: Mapping[str, Image]  # by repository, without tag or digest
    server: str = ""  # the API server for the pods' kubeconfigs
    ca_file: Path | None = None
    base_env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # PATH, HOME, ... of every process

    def node_dir(self, node: str) -> Path:
        return self.cluster_dir / "nodes" / node

    def pod_dir(self, uid: str) -> Path:
        return self.cluster_dir / "pods" / uid

    def claim_dir(self, namespace: str, claim: str) -> Path:
        return self.cluster_dir / "claims" / namespace / claim

    def log_file(self, namespace: str, pod: str, container: str) -> Path:
        return self.cluster_dir / "logs" / f"{namespace}.{pod}.{container}.log"


@dataclasses.dataclass(frozen=True)
class File:
    path: Path
    data: bytes
    mode: int = DEFAULT_FILE_MODE


@dataclasses.dataclass(frozen=True)
class ContainerPlan:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    log: Path
    termination_file: Path
    fallback_to_logs: bool
    sidecar: bool = False  # an init container with restartPolicy Always: runs beside the containers


@dataclasses.dataclass(frozen=True)
class Plan:
    namespace: str
    name: str
    uid: str
    node: str
    restart_policy: str
    job_owned: bool
    pod_dir: Path  # 0700: the pod's volumes, token, kubeconfig and termination files
    dirs: tuple[Path, ...]
    files: tuple[File, ...]
    subpaths: tuple[Path, ...]  # directories made after the files, unless the path exists
    touch: tuple[Path, ...]  # files made empty unless they exist (hostPath FileOrCreate)
    links: tuple[tuple[Path, Path], ...]  # (link, target): mounts inside a directory that holds them
    init_containers: tuple[ContainerPlan, ...]
    containers: tuple[ContainerPlan, ...]


# -- what the pod refers to ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Needs:
    secrets: frozenset[str]
    config_maps: frozenset[str]
    audiences: frozenset[str]


def _volume_sources(volume: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """(kind, source) of a volume, a projected volume's sources one by one."""
    for source in (volume, *((volume.get("projected") or {}).get("sources") or [])):
        for kind in ("secret", "configMap", "downwardAPI", "serviceAccountToken"):
            if kind in source:
                yield kind, source[kind] or {}


def needs(pod: Mapping[str, Any]) -> Needs:
    """The Secrets, ConfigMaps and token audiences the pod's env and volumes use."""
    spec = pod.get("spec") or {}
    secrets: set[str] = set()
    config_maps: set[str] = set()
    audiences: set[str] = set()
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                secrets.add(source["secretRef"]["name"])
            if "configMapRef" in source:
                config_maps.add(source["configMapRef"]["name"])
        for var in container.get("env") or []:
            value_from = var.get("valueFrom") or {}
            if "secretKeyRef" in value_from:
                secrets.add(value_from["secretKeyRef"]["name"])
            if "configMapKeyRef" in value_from:
                config_maps.add(value_from["configMapKeyRef"]["name"])
    for volume in spec.get("volumes") or []:
        for kind, source in _volume_sources(volume):
            if kind == "secret":
                secrets.add(source.get("secretName") or source.get("name") or "")
            elif kind == "configMap":
                config_maps.add(source.get("name") or "")
            elif kind == "serviceAccountToken":
                audiences.add(source.get("audience") or "")
    return Needs(frozenset(secrets - {""}), frozenset(config_maps - {""}), frozenset(audiences))


def updatable(pod: Mapping[str, Any]) -> bool:
    """Whether a volume of the pod has files from a Secret or ConfigMap (which a kubelet updates)."""
    volumes = (pod.get("spec") or {}).get("volumes") or []
    return any(kind in ("secret", "configMap") for v in volumes for kind, _ in _volume_sources(v))


def refreshed(old: Plan, new: Plan) -> tuple[list[File], list[Path]]:
    """What a kubelet updates in a running pod's volumes when a Secret or ConfigMap changed: the
    files of ``new`` that differ from ``old``'s, to write, and ``old``'s volume files that ``new``
    no longer has (a key removed, an optional source gone), to remove. Not those under a subPath
    mount, which keep what they had at the start (and with them the whole volume's, here)."""

    def under(path: Path, roots: Iterable[Path]) -> bool:
        return any(path == r or r in path.parents for r in roots)

    volumes = new.pod_dir / "volumes"

    def updated(f: File) -> bool:
        return volumes in f.path.parents and not under(f.path, new.subpaths)

    before = {f.path: f for f in old.files}
    now = {f.path for f in new.files}
    writes = [f for f in new.files if updated(f) and before.get(f.path) != f]
    removals = [f.path for f in old.files if updated(f) and f.path not in now]
    return writes, removals


# -- volumes ---------------------------------------------------------------------------------------


def _items(
    data: Mapping[str, bytes], items: Sequence[Mapping[str, Any]] | None, default_mode: int
) -> list[tuple[str, bytes, int]]:
    if not items:
        return [(key, value, default_mode) for key, value in sorted(data.items())]
    out = []
    for item in items:
        if item["key"] not in data:
            raise MissingReference(f"key {item['key']!r} not found")
        out.append((item["path"], data[item["key"]], _mode(item, default_mode)))
    return out


def _mode(item: Mapping[str, Any], default_mode: int) -> int:
    return default_mode if item.get("mode") is None else int(item["mode"])


def _relative(path: str) -> PurePosixPath:
    rel = PurePosixPath(path)
    if rel.is_absolute() or ".." in rel.parts:
        raise PlanError(f"volume file path {path!r} must be relative, without '..'")
    return rel


def _volume_files(pod: Mapping[str, Any], volume: Mapping[str, Any], root: Path, refs: References) -> list[File]:
    """The files of a configMap, secret, downwardAPI or projected volume."""
    source_of_volume = next(
        (volume[k] or {} for k in ("projected", "secret", "configMap", "downwardAPI") if k in volume), {}
    )
    default_mode = source_of_volume.get("defaultMode")
    mode = DEFAULT_FILE_MODE if default_mode is None else int(default_mode)
    files: list[File] = []
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    for kind, source in _volume_sources(volume):
        entries: list[tuple[str, bytes, int]] = []
        if kind in ("secret", "configMap"):
            store = refs.secrets if kind == "secret" else refs.config_maps
            name = source.get("secretName") or source.get("name") or ""
            data = store.get(name)
            if data is None:
                if source.get("optional"):
                    continue
                raise MissingReference(f"volume {volume['name']}: {kind} {name!r} not found")
            try:
                entries = _items(data, source.get("items"), mode)
            except MissingReference as exc:
                if source.get("optional"):
                    continue
                raise MissingReference(f"volume {volume['name']}: {exc} in {kind} {name!r}") from exc
        elif kind == "downwardAPI":
            for item in source.get("items") or []:
                if "fieldRef" in item:
                    text = field_value(pod, item["fieldRef"]["fieldPath"])
                else:
                    text = resource_field(pod, containers[0], item["resourceFieldRef"], refs)
                entries.append((item["path"], text.encode(), _mode(item, mode)))
        elif kind == "serviceAccountToken":
            audience = source.get("audience") or ""
            if audience not in refs.tokens:
                raise MissingReference(f"volume {volume['name']}: no token for audience {audience!r}")
            entries.append((source.get("path") or "token", refs.tokens[audience].encode(), mode))
        files.extend(File(root / _relative(path), data, file_mode) for path, data, file_mode in entries)
    return files


@dataclasses.dataclass(frozen=True)
class _Volumes:
    local: Mapping[str, Path]  # volume name -> local path
    dirs: tuple[Path, ...]
    files: tuple[File, ...]
    touch: tuple[Path, ...]


_FILE_TYPES = ("File", "FileOrCreate", "Socket", "CharDevice", "BlockDevice")


def _volumes(pod: Mapping[str, Any], config: RunnerConfig, refs: References) -> _Volumes:
    meta, spec = pod["metadata"], pod["spec"]
    pod_dir = config.pod_dir(meta["uid"])
    local: dict[str, Path] = {}
    dirs: list[Path] = []
    files: list[File] = []
    touch: list[Path] = []
    for volume in spec.get("volumes") or []:
        name = volume["name"]
        if "hostPath" in volume:
            path = config.node_dir(spec["nodeName"]) / volume["hostPath"]["path"].lstrip("/")
            local[name] = path
            kind = volume["hostPath"].get("type")
            dirs.append(path.parent if kind in _FILE_TYPES else path)
            if kind == "FileOrCreate":
                touch.append(path)
        elif "persistentVolumeClaim" in volume:
            local[name] = config.claim_dir(meta["namespace"], volume["persistentVolumeClaim"]["claimName"])
            dirs.append(local[name])
        elif "emptyDir" in volume:
            local[name] = pod_dir / "volumes" / name
            dirs.append(local[name])
        elif any(k in volume for k in ("secret", "configMap", "downwardAPI", "projected")):
            local[name] = pod_dir / "volumes" / name
            dirs.append(local[name])
            files.extend(_volume_files(pod, volume, local[name], refs))
        else:
            kinds = sorted(set(volume) - {"name"})
            raise PlanError(f"volume {name}: {', '.join(kinds) or 'its kind'} is not supported by the local runner")
    return _Volumes(local, tuple(dirs), tuple(files), tuple(touch))


# -- paths ---------------------------------------------------------------------------------------


def localize(text: str, mounts: Mapping[str, Path]) -> str:
    """``text`` with each mount path replaced by its local path, where a path starts: at the start,
    after '=' or after ','; a mount path matches only whole path components."""
    if not mounts:
        return text
    paths = sorted((p.rstrip("/") for p in mounts if p.rstrip("/")), key=len, reverse=True)
    pattern = re.compile(r"(^|[=,])(" + "|".join(re.escape(p) for p in paths) + r")(?=[/,]|$)")
    table = {p.rstrip("/"): str(v) for p, v in mounts.items()}
    return pattern.sub(lambda m: m[1] + table[m[2]], text)


def mount_parents(mount_paths: Iterable[str]) -> list[str]:
    """The directories above mount paths that are neither a mount nor inside one (``/keys`` for
    ``/keys/a`` and ``/keys/b``), the root excluded."""
    paths = {p.rstrip("/") for p in mount_paths if p.rstrip("/")}
    parents = set()
    for path in paths:
        for parent in PurePosixPath(path).parents:
            text = str(parent)
            if text != "/" and not any(text == m or text.startswith(f"{m}/") for m in paths):
                parents.add(text)
    return sorted(parents)


def localize_parent(text: str, parents: Mapping[str, Path]) -> str:
    """``text`` with each of ``parents`` named exactly (at the start, after '=' or after ',', up to
    the end or a ','; a trailing '/' allowed) replaced by its local directory: the parent's other
    contents are the image's, not here, so only the parent itself is rewritten."""
    if not parents:
        return text
    names = sorted(parents, key=len, reverse=True)
    pattern = re.compile(r"(^|[=,])(" + "|".join(re.escape(p) for p in names) + r")/?(?=,|$)")
    return pattern.sub(lambda m: m[1] + str(parents[m[2]]), text)


def parent_links(mounts: Mapping[str, Path], parents: Iterable[str]) -> list[tuple[str, Path]]:
    """The links a directory of ``parents`` shows: each mount directly in it, not one inside
    another mount (that one is reached through the outer mount's link)."""
    inside = [p.rstrip("/") for p in parents]
    paths = [m.rstrip("/") for m in mounts]
    return [
        (m, mounts[m])
        for m in mounts
        if any(m.startswith(f"{p}/") for p in inside)
        and not any(o != m.rstrip("/") and m.startswith(f"{o}/") for o in paths)
    ]


def repository(image: str) -> str:
    """``ghcr.io/x/trainer:0.1.0`` or ``...@sha256:...`` -> ``ghcr.io/x/trainer``."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def local_program(image: Image, argv: Sequence[str], what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The local program for the image's argv (its longest matching program prefix replaced by the
    local one), and the remaining arguments."""
    best: tuple[str, ...] | None = None
    for prefix in image.programs:
        if tuple(argv[: len(prefix)]) == prefix and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is None:
        shown = " ".join(argv[:3]) or "(no command)"
        raise PlanError(f"{what}: no local program for {shown!r}")
    return tuple(image.programs[best]), tuple(argv[len(best) :])


# -- the plan --------------------------------------------------------------------------------------


def _kubeconfig(config: RunnerConfig, token_file: Path) -> bytes:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kimi-dev",
                "cluster": {
                    "server": config.server,
                    **({"certificate-authority": str(config.ca_file)} if config.ca_file else {}),
                },
            }
        ],
        # tokenFile: the projected volume's token, like in-cluster config reads it.
        "users": [{"name": "pod", "user": {"tokenFile": str(token_file)}}],
        "contexts": [{"name": "kimi-dev", "context": {"cluster": "kimi-dev", "user": "pod"}}],
        "current-context": "kimi-dev",
    }
    return json.dumps(doc, indent=2).encode()


def _container(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    config: RunnerConfig,
    refs: References,
    volumes: _Volumes,
    *,
    kubeconfig: Path | None,
    sidecar: bool = False,
) -> tuple[ContainerPlan, list[Path], list[tuple[Path, Path]]]:
    """The container's plan, the subPath directories its mounts need and the links of the
    directories that hold mounts."""
    meta = pod["metadata"]
    name = container["name"]
    what = f"container {name}"
    repo = repository(container.get("image") or "")
    image = config.images.get(repo)
    if image is None:
        raise PlanError(f"{what}: image {repo!r} has no local mapping")
    pod_dir = config.pod_dir(meta["uid"])
    termination = pod_dir / "termination" / name
    own = container_env(pod, container, refs)
    mounts: dict[str, Path] = {}
    subpaths: list[Path] = []
    for mount in container.get("volumeMounts") or []:
        if mount["name"] not in volumes.local:
            raise PlanError(f"{what}: volumeMount names no volume {mount['name']!r}")
        base = volumes.local[mount["name"]]
        sub = mount.get("subPath") or (expand(mount["subPathExpr"], own) if mount.get("subPathExpr") else "")
        mounts[mount["mountPath"]] = base / _relative(sub) if sub else base
        if sub:
            subpaths.append(mounts[mount["mountPath"]])
    # The directories above the volumes' mounts (not above the termination file: /dev is the image's).
    rootfs = pod_dir / "rootfs" / name
    parents = {p: rootfs / p.lstrip("/") for p in mount_parents(mounts)}
    links = [(rootfs / m.strip("/"), target) for m, target in parent_links(mounts, parents)]
    mounts[container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH] = termination

    def local(text: str) -> str:
        return localize_parent(localize(text, mounts), parents)

    env = {**config.base_env, **image.env, "HOSTNAME": (pod["spec"].get("hostname") or meta["name"])}
    env.update({k: local(v) for k, v in own.items()})
    if kubeconfig is not None and SERVICE_ACCOUNT_DIR in mounts:
        env["KUBECONFIG"] = str(kubeconfig)

    command = [expand(a, own) for a in container.get("command") or []]
    args = [expand(a, own) for a in container.get("args") or []]
    # command replaces ENTRYPOINT (and drops CMD); args alone replace CMD.
    argv = [*command, *args] if command else [*image.entrypoint, *(args if container.get("args") else image.cmd)]
    program, rest = local_program(image, argv, what)
    local_argv = (*program, *(local(a) for a in rest))

    cwd = pod_dir
    if container.get("workingDir"):
        wanted = local(container["workingDir"])
        if wanted != container["workingDir"]:
            cwd = Path(wanted)
    refuse_wildcards(what, [*local_argv[len(program) :], *env.values()])
    plan = ContainerPlan(
        name=name,
        argv=local_argv,
        env=env,
        cwd=cwd,
        log=config.log_file(meta["namespace"], meta["name"], name),
        termination_file=termination,
        fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
        sidecar=sidecar,
    )
    return plan, subpaths, links


def refuse_wildcards(what: str, values: Iterable[str]) -> None:
    """PlanError for a value that would bind every interface: ``0.0.0.0`` or ``::`` as a whole value
    (``--host 0.0.0.0``) or as a ``--host=`` value."""
    for value in values:
        bound = value.removeprefix("--host=")
        if bound in WILDCARD_HOSTS:
            raise PlanError(f"{what}: {value!r} would bind every interface; bind the pod's IP (status.podIP)")


def plan(pod: Mapping[str, Any], config: RunnerConfig, refs: References) -> Plan:
    """Everything the runner does for ``pod``, or PlanError (MissingReference: try again later)."""
    meta, spec = pod["metadata"], pod["spec"]
    volumes = _volumes(pod, config, refs)
    files = list(volumes.files)
    pod_dir = config.pod_dir(meta["uid"])
    kubeconfig: Path | None = None
    sa_volumes = {
        m["name"]
        for c in [*(spec.get("initContainers") or []), *spec["containers"]]
        for m in c.get("volumeMounts") or []
        if m["mountPath"].rstrip("/") == SERVICE_ACCOUNT_DIR
    }
    for volume in spec.get("volumes") or []:
        if volume["name"] not in sa_volumes:
            continue
        for kind, source in _volume_sources(volume):
            if kind == "serviceAccountToken" and config.server:
                kubeconfig = pod_dir / "kubeconfig"
                token_file = volumes.local[volume["name"]] / (source.get("path") or "token")
                files.append(File(kubeconfig, _kubeconfig(config, token_file), 0o600))
    init: list[ContainerPlan] = []
    main: list[ContainerPlan] = []
    subpaths: list[Path] = []
    links: list[tuple[Path, Path]] = []
    for container in spec.get("initContainers") or []:
        sidecar = container.get("restartPolicy") == "Always"
        planned, needed, linked = _container(
            pod, container, config, refs, volumes, kubeconfig=kubeconfig, sidecar=sidecar
        )
        init.append(planned)
        subpaths.extend(needed)
        links.extend(linked)
    for container in spec["containers"]:
        planned, needed, linked = _container(pod, container, config, refs, volumes, kubeconfig=kubeconfig)
        main.append(planned)
        subpaths.extend(needed)
        links.extend(linked)
    files.extend(File(c.termination_file, b"") for c in (*init, *main))
    return Plan(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        node=spec["nodeName"],
        restart_policy=spec.get("restartPolicy") or "Always",
        job_owned=job_owned(pod),
        pod_dir=pod_dir,
        dirs=volumes.dirs,
        files=tuple(files),
        subpaths=tuple(dict.fromkeys(subpaths)),
        touch=volumes.touch,
        links=tuple(links),
        init_containers=tuple(init),
        containers=tuple(main),
    )

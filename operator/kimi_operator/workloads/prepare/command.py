"""``kimi-operator prepare``: put a KimiModel's weights on this node, each step skipped when its
completion manifest says it is already done.

Layout under ``--root``: ``int4/`` (the checkpoint as shipped), ``bf16/`` (routed experts in BF16,
for training), ``cpu-int8/`` and ``cpu-int4/`` (kt-kernel CPU expert weights, for serving),
``gguf/<quantization>/`` (one quantization of a GGUF repository, for llama.cpp; its manifest names
the file to load as ``entry``). A directory counts only once its ``manifest.json`` exists (written
last). Free disk is checked
before the download and again before each conversion. Failures exit with the codes in
``kimi_operator.api.exitcodes`` and leave the reason in the pod's termination message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from kimi_operator.api.exitcodes import PrepareExit, WorkloadExit
from kimi_operator.api.kimimodel import FROM_CHECKPOINT, Variant
from kimi_operator.kubeconfig import load_client
from kimi_operator.workloads import hub, manifest, termination
from kimi_operator.workloads.diskspace import InsufficientDisk, require_free
from kimi_operator.workloads.prepare import convert, gguf
from kimi_operator.workloads.prepare.checkpoint import CheckpointError, open_checkpoint
from kimi_operator.workloads.report import Reporter, StatusWriter
from kimi_operator.workloads.termination import WorkloadError

CPU_METHODS = {"cpu-int8": "int8", "cpu-int4": "int4"}
# kt-kernel's CPU weight converter is not part of its wheel; the prepare image carries it and
# points here (see images/prepare/Dockerfile).
KT_CONVERTER_ENV = "KT_CONVERT_SCRIPT"


@dataclasses.dataclass
class Request:
    root: Path
    variants: list[Variant]
    repo: str | None = None
    revision: str | None = None
    endpoint: str | None = None
    token: str | None = None
    source_path: Path | None = None
    download_concurrency: int = 8
    threads: int = 1
    threadpool_count: int = 1
    gguf_repo: str | None = None
    gguf_revision: str | None = None
    gguf_quantization: str | None = None
    gguf_endpoint: str | None = None
    gguf_token: str | None = None


def _int4_dir(req: Request) -> Path:
    return req.source_path if req.source_path is not None else req.root / "int4"


def _complete(directory: Path, revision: str | None) -> bool:
    """Complete when the manifest exists, names the same revision and every file has its size."""
    record = manifest.read(directory)
    return record is not None and record.get("revision") == revision and manifest.verify(directory, deep=False) == []


def _fetch(
    req: Request,
    report: Reporter,
    *,
    repo: str,
    sha: str,
    target: Path,
    files: list[hub.RemoteFile],
    token: str | None,
    endpoint: str | None,
) -> None:
    """Download ``files`` into ``target`` (resuming what is there) and verify every one; a file that
    fails verification is fetched once more before giving up."""
    total = sum(f.size for f in files)
    present = sum(f.size for f in files if (target / f.path).exists() and (target / f.path).stat().st_size == f.size)
    report("DiskCheck", 0, 1)
    require_free(req.root, total - present, what="download")
    target.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        hub.download(
            repo,
            sha,
            target,
            files,
            token=token,
            endpoint=endpoint,
            max_workers=req.download_concurrency,
            on_progress=lambda done, all_: report("Downloading", done, all_),
        )
        report("Verifying", 0, total)
        problems = hub.verify(target, files)
        report("Verifying", total, total)
        if not problems:
            return
        if attempt == 1:
            raise WorkloadError(PrepareExit.CORRUPT_FILE, "; ".join(problems))
        bad = {f.path for f in files if any(p.startswith(f"{target / f.path}:") for p in problems)}
        for path in bad:
            (target / path).unlink(missing_ok=True)


def download(req: Request, report: Reporter) -> str | None:
    """Resolve, download and verify the shipped checkpoint; return the commit sha (None for a path)."""
    if req.source_path is not None:
        open_checkpoint(req.source_path)  # fails fast on a broken local checkpoint
        return None
    assert req.repo is not None
    assert req.revision is not None
    sha, files = hub.resolve(req.repo, req.revision, token=req.token, endpoint=req.endpoint)
    report.revision = sha
    target = req.root / "int4"
    if _complete(target, sha):
        return sha
    _fetch(req, report, repo=req.repo, sha=sha, target=target, files=files, token=req.token, endpoint=req.endpoint)
    open_checkpoint(target)
    manifest.write(target, variant="native-int4", revision=sha)
    return sha


def download_gguf(req: Request, report: Reporter) -> None:
    """The files of one quantization of the GGUF repository, under ``gguf/<quantization>/``."""
    assert req.gguf_repo is not None
    assert req.gguf_revision is not None
    assert req.gguf_quantization is not None
    quant = req.gguf_quantization
    sha, listed = hub.resolve(req.gguf_repo, req.gguf_revision, token=req.gguf_token, endpoint=req.gguf_endpoint)
    report.gguf_revision = sha
    files = gguf.select(req.gguf_repo, listed, quant)
    target = req.root / "gguf" / quant
    # A quantization kept in a directory of its own lands in target as it is named in the repository.
    nested = all(f.path.startswith(f"{quant}/") for f in files)
    first = gguf.entry(files)
    entry = first.removeprefix(f"{quant}/") if nested else first
    report.gguf_entry = entry
    if _complete(target, sha):
        return
    destination = target.parent if nested else target
    _fetch(
        req,
        report,
        repo=req.gguf_repo,
        sha=sha,
        target=destination,
        files=files,
        token=req.gguf_token,
        endpoint=req.gguf_endpoint,
    )
    manifest.write(target, variant="gguf", revision=sha, entry=entry)


def to_bf16(req: Request, revision: str | None, report: Reporter) -> None:
    target = req.root / "bf16"
    if _complete(target, revision):
        return
    report("ConvertingBF16", 0, 1)
    convert.convert(
        _int4_dir(req),
        target,
        threads=req.threads,
        revision=revision,
        on_progress=lambda done, total: report("ConvertingBF16", done, total),
    )


def cpu_bytes(bf16: Path, method: str) -> int:
    """Planned output of kt-kernel's converter: experts at one byte (int8) or half a byte (int4)
    per weight plus scales, and the other tensors as they are."""
    experts = others = 0
    for header in open_checkpoint(bf16).headers.values():
        for name, (_, shape) in header.items():
            size = 2 * math.prod(shape)
            if ".mlp.experts." in name:
                experts += size
            else:
                others += size
    weights = experts // 2 if method == "int8" else experts // 4
    return weights + weights // 16 + others


def to_cpu(req: Request, variant: Variant, revision: str | None, report: Reporter) -> None:
    target = req.root / variant
    if _complete(target, revision):
        return
    script = os.environ.get(KT_CONVERTER_ENV)
    if not script or not Path(script).exists():
        raise WorkloadError(
            PrepareExit.CONVERTER_UNAVAILABLE,
            f"{variant} needs kt-kernel's CPU weight converter; {KT_CONVERTER_ENV} is "
            f"{'unset' if not script else 'a missing file: ' + script} (use the prepare image)",
        )
    method = CPU_METHODS[variant]
    bf16 = req.root / "bf16"
    needed = cpu_bytes(bf16, method)
    report("ConvertingCPU", 0, needed)
    require_free(req.root, needed, what=f"{variant} conversion")
    partial = req.root / f"{variant}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "kimi_operator.workloads.prepare.ktconvert",
        script,
        "--input-path", str(bf16),
        "--input-type", "bf16",
        "--output", str(partial),
        "--quant-method", method,
        "--cpuinfer-threads", str(req.threads),
        "--threadpool-count", str(req.threadpool_count),
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"kt-kernel converter exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    manifest.write(target, variant=variant, revision=revision, tools={"kt-kernel-converter": Path(script).name})
    report("ConvertingCPU", needed, needed)


def run(req: Request, report: Reporter) -> None:
    if "gguf" in req.variants:
        download_gguf(req, report)
    if not any(v in FROM_CHECKPOINT for v in req.variants):
        # The guide's GGUF path: llama.cpp needs none of the INT4 checkpoint's 600 GB.
        report("Done", 1, 1)
        return
    revision = download(req, report)
    wants_bf16 = "bf16" in req.variants or any(v in CPU_METHODS for v in req.variants)
    if wants_bf16:
        to_bf16(req, revision, report)
    for variant in req.variants:
        if variant in CPU_METHODS:
            to_cpu(req, variant, revision, report)
    report("Done", 1, 1)


# Most specific first: the hub's errors share a base class.
_PERMANENT: tuple[tuple[type[Exception], PrepareExit], ...] = (
    (InsufficientDisk, PrepareExit.INSUFFICIENT_DISK),
    (CheckpointError, PrepareExit.INVALID_CHECKPOINT),
    (hub.HubAuthError, PrepareExit.BAD_TOKEN),
    (hub.RevisionNotFound, PrepareExit.UNKNOWN_REVISION),
    (hub.RepoNotFound, PrepareExit.REPO_NOT_FOUND),
)


def exit_code(exc: Exception) -> WorkloadExit | None:
    """The permanent failure an exception stands for; None when a retry may succeed."""
    if isinstance(exc, WorkloadError):
        return exc.code
    return next((code for kind, code in _PERMANENT if isinstance(exc, kind)), None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-operator prepare", description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="directory of this model on the node")
    parser.add_argument("--variants", required=True, help="comma-separated: bf16,cpu-int8,cpu-int4,native-int4,gguf")
    parser.add_argument("--repo", help="hub repository id")
    parser.add_argument("--revision", help="revision to download (resolved to a commit sha)")
    parser.add_argument("--endpoint", help="hub endpoint (a mirror)")
    parser.add_argument("--source-path", type=Path, help="use the checkpoint in this directory instead of the hub")
    parser.add_argument("--download-concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("PREPARE_THREADS") or os.cpu_count() or 1))
    parser.add_argument("--threadpool-count", type=int, default=1, help="NUMA sub-pools of the CPU converter")
    parser.add_argument("--gguf-repo", help="GGUF repository id (the gguf variant)")
    parser.add_argument("--gguf-revision", help="revision of --gguf-repo")
    parser.add_argument("--gguf-quantization", help="the quantization of --gguf-repo to download")
    parser.add_argument("--gguf-endpoint", help="hub endpoint of --gguf-repo (a mirror)")
    parser.add_argument("--report", help="namespace/name of the KimiModel whose status gets this node's progress")
    parser.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node's name")
    args = parser.parse_args(argv)
    # The pod's log says which dequantization kernel ran (native, or numpy and why).
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    variants = [v for v in args.variants.split(",") if v]
    if args.repo is not None and args.source_path is not None:
        parser.error("give one of --repo (with --revision) or --source-path, not both")
    if (args.repo is None and args.source_path is None) and any(v in FROM_CHECKPOINT for v in variants):
        parser.error("the checkpoint's variants need --repo (with --revision) or --source-path")
    unknown = [v for v in variants if v not in (*FROM_CHECKPOINT, "gguf")]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    if ("gguf" in variants) != bool(args.gguf_repo and args.gguf_revision and args.gguf_quantization):
        parser.error("the gguf variant needs --gguf-repo, --gguf-revision and --gguf-quantization, and only it")
    req = Request(
        root=args.root,
        variants=variants,
        repo=args.repo,
        revision=args.revision,
        endpoint=args.endpoint,
        # The token comes from the environment (a secretKeyRef), never from arguments.
        token=os.environ.get("HF_TOKEN") or None,
        source_path=args.source_path,
        download_concurrency=args.download_concurrency,
        threads=max(1, args.threads),
        threadpool_count=args.threadpool_count,
        gguf_repo=args.gguf_repo,
        gguf_revision=args.gguf_revision,
        gguf_quantization=args.gguf_quantization,
        gguf_endpoint=args.gguf_endpoint,
        # A token of its own (a secretKeyRef of spec.gguf), from the environment too.
        gguf_token=os.environ.get("HF_TOKEN_GGUF") or None,
    )
    writer = None
    if args.report:
        namespace, name = args.report.split("/", 1)
        writer = StatusWriter(load_client(), namespace, name, args.node or "unknown")
    report = Reporter(writer)
    try:
        req.root.mkdir(parents=True, exist_ok=True)
        run(req, report)
    except (WorkloadError, InsufficientDisk, CheckpointError, hub.HubError) as exc:
        code = exit_code(exc)
        if code is None:
            # Network trouble and server errors: exit 1, and the Job retries (downloads resume).
            sys.stderr.write(json.dumps({"event": "error", "reason": "HubError", "message": str(exc)}) + "\n")
            return 1
        return termination.fail(code, str(exc))
    return 0


def remove_main(argv: Sequence[str] | None = None) -> int:
    """``kimi-operator remove-model``: delete directories an object left on this node (reclaimPolicy
    Delete): a model's, a fine-tune's outputs, or adapter cache entries."""
    parser = argparse.ArgumentParser(prog="kimi-operator remove-model")
    parser.add_argument("--root", type=Path, action="append", required=True, help="repeatable")
    args = parser.parse_args(argv)
    for root in args.root:
        if root.exists():
            shutil.rmtree(root)
        print(json.dumps({"event": "removed", "path": str(root)}))
    return 0

"""llama.cpp for the tests (`make llamacpp`): the build, its converters' environment, a llama-server on
loopback, and the tensors of a GGUF file as gguf-py reads them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.processes import free_port, stop

ROOT = Path(__file__).parents[1]
GGUF_CONVERT = ROOT / "e2e" / "engines" / "gguf_convert.py"
# What the export reads (adapter.LLAMACPP_SRC_ENV), here as the pod's image sets it.
SRC_ENV = "KIMI_LLAMACPP_SRC"

READ_GGUF = """
import json, sys
from gguf import GGUFReader
reader = GGUFReader(sys.argv[1])
fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith(("general.", "adapter."))}
tensors = {t.name: {"type": t.tensor_type.name, "data": t.data.tolist()} for t in reader.tensors}
print(json.dumps({"fields": fields, "tensors": tensors}))
"""


def build() -> Path:
    """The llama.cpp build named by KIMI_LLAMACPP; a test that needs it fails (never skips) without it."""
    found = os.environ.get("KIMI_LLAMACPP")
    if not found or not (Path(found) / "bin" / "llama-server").exists():
        pytest.fail(
            "KIMI_LLAMACPP is not set to a llama.cpp build (`make llamacpp`): run the tests with `make unit` "
            "or `make e2e`"
        )
    return Path(found)


def with_converter(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the export's converter set to the build's sources, when there is a build."""
    found = env.get("KIMI_LLAMACPP")
    return {**env, SRC_ENV: str(Path(found) / "src")} if found else dict(env)


def _gguf_convert(train_python: str, llamacpp: Path, *args: Path | str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [train_python, str(GGUF_CONVERT), str(llamacpp / "src"), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def convert_model(train_python: str, llamacpp: Path, model: Path, out: Path) -> Path:
    """The Hugging Face model as GGUF (f32), by llama.cpp's own convert_hf_to_gguf.py."""
    _gguf_convert(train_python, llamacpp, "model", model, out)
    return out


def convert_lora(train_python: str, llamacpp: Path, adapter: Path, model: Path, out: Path) -> Path:
    """The PEFT adapter of ``model`` as GGUF (f32), by llama.cpp's own convert_lora_to_gguf.py."""
    _gguf_convert(train_python, llamacpp, "lora", adapter, model, out)
    return out


def read_gguf(train_python: str, llamacpp: Path, path: Path) -> dict[str, Any]:
    """The file's general/adapter metadata and every tensor (type and data), read by gguf-py."""
    env = {**os.environ, "PYTHONPATH": str(llamacpp / "src" / "gguf-py")}
    proc = subprocess.run(
        [train_python, "-c", READ_GGUF, str(path)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def http_json(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 (loopback)
        return json.load(resp)


@contextlib.contextmanager
def server(llamacpp: Path, model: Path, adapters: list[Path], log: Path) -> Iterator[str]:
    """llama-server on loopback with the adapters at scale 0 (a request picks them by id), one slot,
    one thread; yields its URL once it is healthy, and stops it."""
    host = "127.0.0.1"
    port = free_port(host)
    argv = [str(llamacpp / "bin" / "llama-server"), "-m", str(model), "--host", host, "--port", str(port)]
    argv += ["-c", "512", "-np", "1", "-t", "1"]
    if adapters:
        argv += ["--lora-scaled", ",".join(f"{path}:0" for path in adapters)]
    with running(argv, f"http://{host}:{port}", log) as url:
        yield url


@contextlib.contextmanager
def running(argv: list[str], url: str, log: Path) -> Iterator[str]:
    """llama-server started with ``argv`` (listening at ``url``), its output in ``log``; yields the
    URL once it is healthy, and stops it."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "llama-server not healthy after 60 s"
            with contextlib.suppress(OSError):
                if http_json(f"{url}/health").get("status") == "ok":
                    break
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)

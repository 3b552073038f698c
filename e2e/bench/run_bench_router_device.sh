#!/usr/bin/env bash
# make bench-router on a machine with more cores and no package registry (the device machine, 16
# cores), from the repo root: the same e2e/bench/bench_router.py, engines, routers and load, with the
# missing Python packages installed from wheels carried along instead of from PyPI.
#   bash e2e/bench/run_bench_router_device.sh OUT_DIR [more bench_router.py arguments, e.g. --levels ...]
# It writes OUT_DIR/router.json (the bench's JSON), OUT_DIR/run.log (everything printed, the table
# at its end), OUT_DIR/env.txt (versions, cores) and OUT_DIR/logs.tar.gz (engines' and routers' logs).
#
# One python serves all three roles (the image's python3: torch, transformers, peft, tokenizers,
# safetensors, aiohttp, pyyaml), each through a small wrapper that sets its own PYTHONPATH:
#   engines (--train-python)          the image alone, one intra-op thread each (OMP/MKL/OpenBLAS = 1)
#   our router (--router-python)      ROUTER_SRC (the kimi_operator package), then SITE
#   sglang-router (--sglang-router-python)  SITE
# and the load generator runs with SITE too. SITE is made here from WHEELS (pip install --no-deps
# --target): requirements/bench-router.lock (sglang-router 0.3.2 and its launcher's needs, which
# include the router's aiohttp and pydantic) plus prometheus_client and PyYAML at the versions of
# requirements/dev.lock. build/ is git-ignored: carry WHEELS (and ROUTER_SRC, if under build/). Made on
# any machine with pip, for the target's Python (3.12 on the device machine):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d build/bench-router-wheels \
#     -r requirements/bench-router.lock prometheus_client==0.26.0 PyYAML==6.0.4
# Env: PYTHON (default python3), WHEELS (default build/bench-router-wheels), SITE (default
#      /tmp/bench-router-site), ROUTER_SRC (default operator: the directory holding kimi_operator,
#      e.g. `git archive` of a commit), WORK (default /tmp/bench-router-work).
set -uo pipefail
O=${1:?output directory}; shift
mkdir -p "$O"; O=$(cd "$O" && pwd)
exec > >(tee -a "$O/run.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=$(command -v "${PYTHON:-python3}") || { echo "no python"; exit 1; }
WHEELS=${WHEELS:-build/bench-router-wheels} SITE=${SITE:-/tmp/bench-router-site}
WORK=${WORK:-/tmp/bench-router-work}
ROUTER_SRC=$(cd "${ROUTER_SRC:-operator}" && pwd) || exit 1
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

stamp "wheels into $SITE"
rm -rf "$SITE"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
  --target "$SITE" "$WHEELS"/*.whl || exit 1

# The three wrappers: each replaces PYTHONPATH (the bench gives our router PYTHONPATH=operator; with
# ROUTER_SRC=operator that is the same package). exec keeps the pid the bench reads CPU time from.
BIN=$SITE/.bench-bin; mkdir -p "$BIN"
cat > "$BIN/engine-python" <<EOF
#!/bin/sh
unset PYTHONPATH
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" "\$@"
EOF
cat > "$BIN/router-python" <<EOF
#!/bin/sh
export PYTHONPATH="$ROUTER_SRC:$SITE"
exec "$PYTHON" "\$@"
EOF
cat > "$BIN/sglang-router-python" <<EOF
#!/bin/sh
export PYTHONPATH="$SITE"
exec "$PYTHON" "\$@"
EOF
chmod +x "$BIN"/*

# Engines on 127.77.0.x unless this machine's loopback does not take that address.
PREFIX=$("$PYTHON" - <<'EOF'
import socket
for prefix in ("127.77.0", "127.0.0"):
    try:
        for n in (1, 2, 3, 10, 11, 12):
            with socket.socket() as s:
                s.bind((f"{prefix}.{n}", 0))
        print(prefix)
        break
    except OSError:
        pass
EOF
)
[ -n "$PREFIX" ] || { echo "no loopback address prefix binds"; exit 1; }

{
  echo "cores: nproc $(nproc), os.cpu_count $("$PYTHON" -c 'import os; print(os.cpu_count())'), cgroup cpu.max $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo -)"
  grep -m1 'model name' /proc/cpuinfo; uname -r; "$PYTHON" -V
  echo "loopback prefix: $PREFIX"
  if [ -f "$ROUTER_SRC/../COMMIT" ]; then echo "router source: $ROUTER_SRC, commit $(cat "$ROUTER_SRC/../COMMIT")"
  else echo "router source: $ROUTER_SRC, work tree at $(git rev-parse HEAD 2>/dev/null || echo ?) $(git status --porcelain -- operator 2>/dev/null | wc -l) changed files"; fi
  echo "engines:"
  "$BIN/engine-python" -c '
import importlib.metadata as md, torch
print("  torch threads", torch.get_num_threads(), "interop", torch.get_num_interop_threads())
for d in ("torch", "transformers", "peft", "tokenizers", "safetensors"):
    print("  ", d, md.version(d))' || exit 1
  echo "our router:"
  "$BIN/router-python" -c '
import importlib.metadata as md, aiohttp, prometheus_client, pydantic, yaml, kimi_operator.router.main as m
print("  ", m.__file__)
for mod, d in ((aiohttp, "aiohttp"), (prometheus_client, "prometheus-client"), (pydantic, "pydantic"), (yaml, "pyyaml")):
    print("  ", d, md.version(d), mod.__file__)' || exit 1
  echo "sglang-router:"
  "$BIN/sglang-router-python" -c '
import importlib.metadata as md, sglang_router.launch_router
print("  ", "sglang-router", md.version("sglang-router"), sglang_router.launch_router.__file__)' || exit 1
  echo "load generator:"
  PYTHONPATH=$SITE "$PYTHON" -c '
import importlib.metadata as md, aiohttp, yaml
print("  ", "aiohttp", md.version("aiohttp"), aiohttp.__file__)' || exit 1
} > "$O/env.txt" 2>&1
rc=$?; cat "$O/env.txt"; [ $rc -eq 0 ] || exit 1

stamp "bench_router.py $*"
PYTHONPATH=$SITE "$PYTHON" e2e/bench/bench_router.py --work "$WORK" --out "$O/router.json" \
  --train-python "$BIN/engine-python" --router-python "$BIN/router-python" \
  --sglang-router-python "$BIN/sglang-router-python" --ip-prefix "$PREFIX" "$@"
rc=$?
stamp "bench rc=$rc"
tar -czf "$O/logs.tar.gz" -C "$WORK" logs 2>/dev/null
exit $rc

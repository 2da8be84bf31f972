#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once per machine and cache it.
#
# Result (stable name, a symlink to the versioned binary):
#   ${BATCHGATE_CACHE:-$HOME/.cache/batchgate}/llama-server
#     -> llama-server-lcp<LLAMA_CPP_PYTHON_VERSION>
#
# Idempotent: if the versioned binary exists and `--version` succeeds, only the
# symlink is (re)pointed and we exit at once. Otherwise the llama.cpp sources
# vendored in the llama-cpp-python sdist (PyPI) are built (~5 min on 2 cores)
# in a temp dir and the binary is moved into the cache atomically. Concurrent
# runs are serialised with flock. Prints the binary path on stdout (last line).
set -euo pipefail

# Pinned: llama-cpp-python sdist that vendors llama.cpp (gguf-py inside it is
# gguf 0.19.0, the version make_tiny_model.py pins).
LCP_VERSION="${LCP_VERSION:-0.3.36}"
LCP_SHA256_0_3_36="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
JOBS="${JOBS:-2}"
# EXTRA_CMAKE_ARGS (env, word-split) is appended to the cmake configure line.

CACHE="${BATCHGATE_CACHE:-$HOME/.cache/batchgate}"
NAME="llama-server-lcp${LCP_VERSION}"
BIN="$CACHE/$NAME"
LINK="$CACHE/llama-server"

log() { echo "[build_llama_server] $*" >&2; }

binary_ok() { [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; }

point_link() {
    # atomic symlink replacement: create aside, then rename over
    ln -sfn "$NAME" "$LINK.tmp.$$"
    mv -fT "$LINK.tmp.$$" "$LINK"
}

mkdir -p "$CACHE"

if binary_ok; then
    point_link
    echo "$LINK"
    exit 0
fi

# Serialise concurrent builders (two CI jobs, two e2e fixtures...).
exec 9>"$CACHE/.build.lock"
flock 9
if binary_ok; then  # someone else built it while we waited
    point_link
    echo "$LINK"
    exit 0
fi

# --- build dependencies ------------------------------------------------------
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v gcc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
if ((${#need[@]})); then
    log "installing missing build deps: ${need[*]}"
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

start=$(date +%s)
TMP="$(mktemp -d "$CACHE/.build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# --- sources -----------------------------------------------------------------
SDIST="$CACHE/src/llama_cpp_python-${LCP_VERSION}.tar.gz"
if [[ ! -s "$SDIST" ]]; then
    log "downloading llama-cpp-python==$LCP_VERSION sdist from PyPI"
    mkdir -p "$CACHE/src"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$LCP_VERSION" -d "$TMP/dl" >&2
    mv -f "$TMP/dl/llama_cpp_python-${LCP_VERSION}.tar.gz" "$SDIST.part"
    mv -f "$SDIST.part" "$SDIST"
fi
if [[ "$LCP_VERSION" == "0.3.36" ]]; then
    echo "$LCP_SHA256_0_3_36  $SDIST" | sha256sum -c --quiet - \
        || { log "sha256 mismatch for $SDIST"; rm -f "$SDIST"; exit 1; }
fi
log "extracting vendor/llama.cpp"
tar -xzf "$SDIST" -C "$TMP" --wildcards "llama_cpp_python-${LCP_VERSION}/vendor/llama.cpp/*"
SRC="$TMP/llama_cpp_python-${LCP_VERSION}/vendor/llama.cpp"

# --- configure -----------------------------------------------------------------
# Flags (llama.cpp as vendored in llama-cpp-python 0.3.36):
#   LLAMA_BUILD_UI=OFF, LLAMA_USE_PREBUILT_UI=OFF : no npm build and no download
#       of the web UI from a Hugging Face bucket (no internet); server has no UI.
#   LLAMA_OPENSSL=OFF   : plain HTTP on 127.0.0.1 only; no libssl dependency.
#   LLAMA_CURL          : not passed - removed in this version (only a deprecation
#       warning remains); model download support is gone/unused anyway.
#   BUILD_SHARED_LIBS=OFF : one self-contained binary (only libc/libstdc++/libgomp).
#   GGML_NATIVE=OFF     : no -march=native. The build machine has AVX-512; a
#       native binary could SIGILL if the cache is reused on another host. With
#       NATIVE=OFF ggml still enables SSE4.2/AVX/AVX2/FMA/F16C/BMI2 (x86-64-v3).
#       For a 64-wide model speed is dominated by per-token overhead anyway.
#   GGML_CCACHE=OFF     : deterministic, no dependence on a host ccache.
#   LLAMA_BUILD_TESTS/EXAMPLES=OFF : less to configure (we build one target).
#   LLAMA_BUILD_COMMIT  : the sdist has no .git; tag --version with the pin.
log "configuring"
cmake -S "$SRC" -B "$TMP/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF \
    -DGGML_CCACHE=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_COMMIT="llama-cpp-python-${LCP_VERSION}" \
    ${EXTRA_CMAKE_ARGS:-} \
    >"$TMP/configure.log" 2>&1 \
    || { cat "$TMP/configure.log" >&2; exit 1; }

# --- build -------------------------------------------------------------------
log "building target llama-server with -j$JOBS (takes ~5 min on 2 cores)"
cmake --build "$TMP/build" --target llama-server -j "$JOBS" >"$TMP/build.log" 2>&1 \
    || { tail -n 60 "$TMP/build.log" >&2; exit 1; }

OUT="$TMP/build/bin/llama-server"
"$OUT" --version >/dev/null 2>&1 || { log "built binary fails --version"; exit 1; }
strip "$OUT" 2>/dev/null || true

# --- install atomically ----------------------------------------------------------
cp "$OUT" "$BIN.tmp.$$"
chmod 755 "$BIN.tmp.$$"
mv -f "$BIN.tmp.$$" "$BIN"
point_link
log "built in $(($(date +%s) - start)) s: $BIN ($(du -h "$BIN" | cut -f1))"
echo "$LINK"

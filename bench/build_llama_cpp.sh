#!/usr/bin/env bash
# Build native llama.cpp (llama-bench, llama-server, llama-cli) from the tree that the
# llama-cpp-python sdist vendors, tuned for this CPU: the strongest CPU peer for bench/.
#
#   bash bench/build_llama_cpp.sh [DEST]        # DEST defaults to ~/.cache/fulmine/llama.cpp
#
# Idempotent: an existing build of the same version is kept. The binaries land in DEST/bin;
# bench.compare's `llama-bench` engine finds them there (or through $LLAMA_CPP_BIN).
# AMX is off, as in the llama-cpp-python build the benchmarks use (with it on, the build
# crashed on this CPU; docs/BENCHMARKS.md). Takes ~10 minutes on 2 cores.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="${1:-$HOME/.cache/fulmine/llama.cpp}"
STAMP="$DEST/bin/.built-$VERSION"

if [[ -f "$STAMP" ]]; then
    echo "llama.cpp from llama-cpp-python $VERSION already built in $DEST/bin"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

# -march=native with the AMX extensions masked out (explicit -mno-* flags win over -march in gcc)
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >"$WORK/cmake.log" ||
    { cat "$WORK/cmake.log"; exit 1; }
cmake --build "$WORK/build" --config Release -j "$(nproc)" --target llama-bench llama-server llama-cli

mkdir -p "$DEST/bin"
for tool in llama-bench llama-server llama-cli; do
    cp "$WORK/build/bin/$tool" "$DEST/bin/"
done
touch "$STAMP"
echo "built $(ls "$DEST/bin" | tr '\n' ' ')in $DEST/bin"

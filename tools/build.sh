#!/usr/bin/env bash
# Configures and builds everything into build/ (binaries in build/bin/).
# Extra arguments go to CMake's configure step, e.g. -DVMM_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
launcher=()
if command -v ccache >/dev/null; then
  # Compiles are cached by content; with the repository as the base
  # directory, clones in other folders (CI's fresh checkout) share the hits.
  export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "${launcher[@]}" "$@" >/dev/null
cmake --build build -j "$(nproc)"

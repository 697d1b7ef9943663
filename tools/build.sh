#!/usr/bin/env bash
# Configures and builds everything into build/ (binaries in build/bin/).
# Extra arguments go to CMake's configure step, e.g. -DVMM_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build build -j "$(nproc)"

#!/usr/bin/env bash
# Builds every standard CMake build type other than TESTED (the type of the
# build being tested; default RelWithDebInfo, tools/build.sh's) into
# build-<type>/, under the same strict warnings (-Wall -Wextra -Werror).
# GCC's warnings that come from the optimizer (-Wrestrict, -Wstringop-*,
# -Wmaybe-uninitialized, ...) differ between -O0, -O2, -O3 and -Os, so a type
# nobody builds can stop compiling unseen. The test suites are left out to
# keep this cheap (they are built and run in TESTED); compiles go through
# ccache as in tools/build.sh. ctest runs this as the test `build_types`.
#
#   tools/check-build-types.sh [TESTED]
set -euo pipefail
cd "$(dirname "$0")/.."
tested=${1:-RelWithDebInfo}
launcher=()
if command -v ccache >/dev/null; then
  export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
for type in Debug Release RelWithDebInfo MinSizeRel; do
  [[ $type == "$tested" ]] && continue
  dir=build-${type,,}
  started=$SECONDS
  echo "== $type in $dir/"
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE="$type" -DVMM_BUILD_TESTS=OFF "${launcher[@]}" >/dev/null
  if ! cmake --build "$dir" -j "$(nproc)"; then
    echo "FAILED: the $type build does not compile under the strict warnings (see above)" >&2
    exit 1
  fi
  echo "== $type built in $((SECONDS - started)) s"
done

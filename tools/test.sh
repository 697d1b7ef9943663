#!/usr/bin/env bash
# Sets up, builds and runs every test. Tests that need /dev/kvm (or
# /dev/liveupdate) skip with a reason where it is absent; ctest's summary
# lists them as "Skipped" so the count is visible. The test build_types also
# builds the other standard build types into build-<type>/ (see
# tools/check-build-types.sh); `tools/test.sh -LE build-types` skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
tools/build.sh
cd build
ctest --output-on-failure --timeout 900 "$@"

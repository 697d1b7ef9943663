#!/usr/bin/env bash
# Sets up, builds and runs the blackout benchmark, then publishes its table
# and plots in docs/performance.md (method: the same file):
#
#   tools/bench.sh                       # the default matrix
#   tools/bench.sh --sizes 256M,1G --updates 5 --peers none
#
# Arguments go to `build/bin/vmm-bench blackout` (see its --help). The full
# output lands in bench-results/DATE-TIME/ (or --out DIR); summary.md, the
# PNGs and samples.csv are copied to docs/performance/, and summary.md is
# spliced into docs/performance.md between its bench:results markers.
# The default matrix takes hours: each update waits until the guest has
# re-faulted its RAM, tens of seconds at 4G and 8G.
set -euo pipefail
cd "$(dirname "$0")/.."

tools/setup.sh
tools/build.sh

args=("$@")
out=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) out="${args[i + 1]:-}" ;;
    --out=*) out="${args[i]#--out=}" ;;
  esac
done
if [[ -z "$out" ]]; then
  out="bench-results/$(date +%Y%m%d-%H%M%S)"
  args+=(--out "$out")
fi

status=0
build/bin/vmm-bench blackout "${args[@]}" || status=$?

# Publish whatever was measured, even after a failure: summary.md lists it.
if [[ -f "$out/summary.md" ]]; then
  mkdir -p docs/performance
  rm -f docs/performance/*.png
  cp "$out/summary.md" "$out/samples.csv" docs/performance/
  for png in "$out"/*.png; do
    if [[ -e "$png" ]]; then cp "$png" docs/performance/; fi
  done
  # summary.md one heading level down, its images seen from docs/.
  results=$(mktemp)
  sed -e 's/^#/##/' -e 's/](\([a-z]*\.png\))/](performance\/\1)/g' "$out/summary.md" >"$results"
  awk -v results="$results" '
    /<!-- bench:results:begin -->/ { print; while ((getline line < results) > 0) print line; skip = 1; next }
    /<!-- bench:results:end -->/ { skip = 0 }
    !skip { print }
  ' docs/performance.md >docs/performance.md.new
  mv docs/performance.md.new docs/performance.md
  rm -f "$results"
  echo "bench: results in $out; docs/performance.md and docs/performance/ updated"
fi
exit "$status"

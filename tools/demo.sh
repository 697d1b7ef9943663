#!/usr/bin/env bash
# The main job: set up, build, launch the default VM (the embedded test guest
# in 256 MiB of guest_memfd RAM plus a 16 MiB shared memfd), show it running
# through its control socket, live-update it twice with guest memory kept in
# place (exec of a new vmm binary in the same process, then transfer to a new
# vmm process built before the pause), verify the guest, and shut it down.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
tools/build.sh

workdir=$(mktemp -d /tmp/vmm-demo.XXXXXX)
socket="$workdir/vmm.sock"
console="$workdir/console.log"
vmmctl() { build/bin/vmmctl -s "$socket" "$@"; }
step() { printf '\n== %s\n' "$*"; }

cleanup() {
  if [[ -n "${vmm_pid:-}" ]] && kill -0 "$vmm_pid" 2>/dev/null; then kill "$vmm_pid"; wait "$vmm_pid" || true; fi
  if [[ -n "${new_pid:-}" ]] && kill -0 "$new_pid" 2>/dev/null; then kill "$new_pid" || true; fi
  rm -rf "$workdir"
}
trap cleanup EXIT

# sweep-ms=50: the guest re-reads all of its RAM every 50 ms, so the update
# can report the brown-out (how long the rebuilt VM took to re-fault it).
step "launch: build/bin/vmm run --cmdline sweep-ms=50 --control-socket $socket --console $console"
build/bin/vmm run --cmdline sweep-ms=50 --control-socket "$socket" --console "$console" &
vmm_pid=$!
for _ in $(seq 1 500); do [[ -S "$socket" ]] && break; sleep 0.01; done
[[ -S "$socket" ]] || { echo "vmm did not create its control socket"; exit 1; }

step "status (through socat, the way any QMP client talks to it)"
printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-status","id":1}' |
  socat -t 1 - UNIX-CONNECT:"$socket"

step "memory: RAM in guest_memfd, the shared region in a memfd"
vmmctl memory

step "guest heartbeat"
sleep 1
vmmctl guest

step "stop: the heartbeat freezes"
vmmctl stop >/dev/null
before=$(vmmctl --json guest | sed -E 's/.*"heartbeat":([0-9]+).*/\1/')
sleep 0.5
after=$(vmmctl --json guest | sed -E 's/.*"heartbeat":([0-9]+).*/\1/')
echo "heartbeat while paused: $before -> $after"
[[ "$before" == "$after" ]] || { echo "the guest ran while paused"; exit 1; }

step "cont: the heartbeat resumes"
vmmctl cont >/dev/null
sleep 0.3
vmmctl --json guest

step "verify every page of guest RAM"
vmmctl verify

step "vCPUs"
vmmctl vcpus

step "live update: exec a new vmm around the same guest memory"
inodes_before=$(vmmctl --json memory | grep -o '"inode":[0-9]*' | tr '\n' ' ')
pid_before=$vmm_pid
vmmctl live-update --mode exec
sleep 0.5
step "the update, as the new vmm reports it (blackout and the gap the guest saw)"
vmmctl update-status
inodes_after=$(vmmctl --json memory | grep -o '"inode":[0-9]*' | tr '\n' ' ')
echo "memory inodes before: $inodes_before"
echo "memory inodes after:  $inodes_after"
[[ "$inodes_before" == "$inodes_after" ]] || { echo "guest memory moved"; exit 1; }
echo "RssAnon of vmm (pid $pid_before) after the update: $(grep RssAnon /proc/$pid_before/status | awk '{print $2, $3}')"

step "verify every page of guest RAM after the update"
vmmctl verify

step "live update: transfer to a new vmm process that builds its VM before the pause"
vmmctl live-update --mode transfer
new_pid=$(vmmctl --json update-status | grep -o '"pid":[0-9]*' | cut -d: -f2)
status=0
wait "$vmm_pid" || status=$?
echo "the old vmm (pid $vmm_pid) handed the VM to pid $new_pid and exited with status $status"
vmm_pid=""
[[ "$status" == 0 && -n "$new_pid" && "$new_pid" != "$pid_before" ]] || { echo "the transfer did not move the VM"; exit 1; }
# The brown-out is known once the guest's RAM sweep runs at its old speed again.
for _ in $(seq 1 100); do vmmctl --json update-status | grep -q '"brownout_status":"pending"' || break; sleep 0.1; done
vmmctl update-status
inodes_after=$(vmmctl --json memory | grep -o '"inode":[0-9]*' | tr '\n' ' ')
echo "memory inodes after:  $inodes_after"
[[ "$inodes_before" == "$inodes_after" ]] || { echo "guest memory moved"; exit 1; }
echo "RssAnon of the new vmm (pid $new_pid): $(grep RssAnon /proc/$new_pid/status | awk '{print $2, $3}')"

step "verify every page of guest RAM after the transfer"
vmmctl verify

step "quit"
vmmctl quit >/dev/null
# The new vmm is not this shell's child: wait for it to go away.
for _ in $(seq 1 500); do kill -0 "$new_pid" 2>/dev/null || break; sleep 0.01; done
if kill -0 "$new_pid" 2>/dev/null; then echo "vmm (pid $new_pid) did not exit"; exit 1; fi
echo "vmm (pid $new_pid) exited"
new_pid=""
[[ ! -e "$socket" ]] && echo "control socket removed"
step "guest console (last lines)"
tail -n 8 "$console"

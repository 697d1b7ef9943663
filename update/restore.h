// The restore half of a live update, in the new process: retrieve the VM's
// files from the LUO session by token and rebuild the VM around them.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "luo/kernel_backend.h"
#include "luo/session.h"
#include "migration/saved_state.h"
#include "update/faults.h"
#include "update/handover.h"

namespace vmm {

struct RetrievedVm {
  UniqueFd vm_fd;                      // a new, empty VM; invalid: none was preserved
  std::vector<UniqueFd> region_files;  // in the order of state.memory
  migration::SavedState state;
};

// Retrieves the state first, then the VM (when the state says it was
// preserved), then every region by the token the state names, refusing a
// guest_memfd whose VM token is not the VM's. Reads
// the state into private memory and never writes guest memory or the state
// memfd, so a failed restore can be retried. `fault` injects test failures.
[[nodiscard]] Result<RetrievedVm> retrieve_vm(luo::Session& session, Fault fault);

// /dev/liveupdate is single-open: another vmm's update or restore may hold
// it for a moment. Retries EBUSY for up to `busy_wait` (or until
// `cancelled`), then returns the device's own error, which names who to
// look for.
// `device` and `syscalls` are for tests (a fake kernel). With a LUO agent
// the vmm does not open the device at all: update/session_source.h.
[[nodiscard]] Result<std::unique_ptr<luo::KernelBackend>> open_liveupdate(
    const std::atomic<bool>* cancelled = nullptr, std::chrono::milliseconds busy_wait = std::chrono::seconds(10),
    const std::string& device = luo::kLiveUpdateDevice, luo::KernelSyscalls syscalls = luo::real_kernel_syscalls());

// Moves every vCPU's TSC and the kvmclock forward by the time the VM spent
// frozen, so the guest sees the real time that passed.
void advance_clocks(migration::SavedState& state, int64_t elapsed_ns);
// vCPU 0's TSC in the state (0 if it has none).
[[nodiscard]] uint64_t guest_tsc(const migration::SavedState& state);

}  // namespace vmm

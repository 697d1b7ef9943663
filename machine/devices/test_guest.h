// The VMM's end of the test guest's shared-region protocol (guest/protocol.h):
// writes the configuration before boot, reads the heartbeat, the status and
// the RAM sweep timings, and asks the guest to verify its page stamps.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stop_token>
#include <vector>

#include "guest/protocol.h"
#include "base/result.h"

namespace vmm::devices {

struct VerifyResult {
  uint64_t request = 0;
  uint64_t pages_checked = 0;
  uint64_t mismatches = 0;
  std::optional<uint64_t> first_mismatch_gpa;
  std::chrono::microseconds duration{0};
};

struct GuestVcpuStatus {
  uint64_t ticks = 0;
  uint64_t pages_dirtied = 0;
  uint64_t pass = 0;
  bool online = false;
};

struct GuestStatus {
  uint64_t phase = 0;
  uint64_t heartbeat = 0;
  uint64_t heartbeat_tsc = 0;
  uint64_t pages_total = 0;
  uint64_t pages_stamped = 0;
  uint32_t vcpus_online = 0;
  uint64_t pages_dirtied = 0;
  uint64_t sweep_passes = 0;   // completed RAM sweep passes (guest option sweep-ms)
  uint64_t last_sweep_us = 0;  // the latest pass's duration; 0 if none
  std::vector<GuestVcpuStatus> vcpus;
};

// The largest gap between consecutive heartbeats the guest recorded after
// heartbeat `since`, in TSC ticks; read from the guest's ring.
struct HeartbeatGap {
  uint64_t gap_tsc = 0;
  uint64_t after_heartbeat = 0;  // the gap ends at this heartbeat
};

// One pass of the guest's RAM sweep (sweep-ms=N): a read of every stampable
// page, timed with the guest's TSC. Passes are numbered from 1.
struct SweepPass {
  uint64_t number = 0, start_tsc = 0, end_tsc = 0;
};

// A pass's duration. 0 for a span the TSC crossed backwards (a restore
// elsewhere) or without a TSC frequency.
[[nodiscard]] inline uint64_t sweep_pass_us(const SweepPass& pass, uint64_t tsc_khz) {
  return tsc_khz != 0 && pass.end_tsc > pass.start_tsc ? (pass.end_tsc - pass.start_tsc) * 1000 / tsc_khz : 0;
}

class TestGuestLink {
 public:
  // `shared` is the VMM's mapping of the shared region.
  TestGuestLink(uint8_t* shared, uint64_t shared_size) : shared_size_(shared_size),
      shared_(reinterpret_cast<volatile vmm_guest_shared*>(shared)) {}

  // Fills the configuration before the first vCPU runs.
  void configure(uint32_t vcpus, uint64_t seed, uint64_t tsc_khz);

  [[nodiscard]] GuestStatus status() const;
  [[nodiscard]] uint64_t seed() const { return shared_->seed; }
  [[nodiscard]] uint64_t tsc_khz() const { return shared_->tsc_khz; }
  [[nodiscard]] uint32_t vcpus() const { return shared_->nr_vcpus; }
  // True once the guest has written anything: an arbitrary --kernel never does.
  [[nodiscard]] bool guest_speaks() const { return shared_->phase != VMM_GUEST_PHASE_BOOTING || shared_->heartbeat != 0; }

  // Asks every vCPU to verify its slice and waits for all answers. Waits for
  // stamping to finish first. Serialized: one verification at a time. Gives
  // up with ECANCELED as soon as `stop` is requested (the vmm is shutting down).
  [[nodiscard]] Result<VerifyResult> verify(std::chrono::milliseconds timeout, std::stop_token stop = {});
  [[nodiscard]] std::optional<VerifyResult> last_verify() const;
  void set_last_verify(std::optional<VerifyResult> result);

  // Nothing when the ring no longer holds heartbeat `since` (it was
  // overwritten): a gap measured without it would be wrong.
  [[nodiscard]] std::optional<HeartbeatGap> largest_gap_since(uint64_t since_heartbeat) const;

  // The RAM sweep. The passes numbered above `after_number` that the guest's
  // ring still holds, oldest first: at most the last VMM_GUEST_SWEEP_RING - 1
  // (the slot the guest may be rewriting is left out). Each one read whole:
  // the count is re-read after copying and anything the guest may have
  // overwritten meanwhile is dropped.
  [[nodiscard]] std::vector<SweepPass> sweeps_since(uint64_t after_number) const;
  [[nodiscard]] uint64_t sweep_passes() const;
  // The guest's sweep period; 0 when it does not sweep.
  [[nodiscard]] uint64_t sweep_ms() const;

 private:
  // False for a shared region too small to hold the sweep fields.
  [[nodiscard]] bool holds_sweep() const { return shared_size_ >= sizeof(vmm_guest_shared); }

  uint64_t shared_size_;
  volatile vmm_guest_shared* shared_;
  std::mutex verify_mutex_;
  mutable std::mutex last_mutex_;
  std::optional<VerifyResult> last_verify_;
};

}  // namespace vmm::devices

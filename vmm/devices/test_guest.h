// The VMM's end of the test guest's shared-region protocol (guest/protocol.h):
// writes the configuration before boot, reads the heartbeat and status, and
// asks the guest to verify its page stamps.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "guest/protocol.h"
#include "kvm/result.h"

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
  std::vector<GuestVcpuStatus> vcpus;
};

// The largest gap between consecutive heartbeats the guest recorded after
// heartbeat `since`, in TSC ticks; read from the guest's ring.
struct HeartbeatGap {
  uint64_t gap_tsc = 0;
  uint64_t after_heartbeat = 0;  // the gap ends at this heartbeat
};

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
  // stamping to finish first. Serialized: one verification at a time.
  [[nodiscard]] Result<VerifyResult> verify(std::chrono::milliseconds timeout);
  [[nodiscard]] std::optional<VerifyResult> last_verify() const;
  void set_last_verify(std::optional<VerifyResult> result);

  // Nothing when the ring no longer holds heartbeat `since` (it was
  // overwritten): a gap measured without it would be wrong.
  [[nodiscard]] std::optional<HeartbeatGap> largest_gap_since(uint64_t since_heartbeat) const;

 private:
  uint64_t shared_size_;
  volatile vmm_guest_shared* shared_;
  std::mutex verify_mutex_;
  mutable std::mutex last_mutex_;
  std::optional<VerifyResult> last_verify_;
};

}  // namespace vmm::devices

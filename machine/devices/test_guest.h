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
#include "migration/saved_state.h"

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
// heartbeat `since`, in TSC ticks; read from the guest's ring. A step whose
// TSC goes backwards counts as no gap.
struct HeartbeatGap {
  uint64_t gap_tsc = 0;
  uint64_t after_heartbeat = 0;  // the gap ends at this heartbeat
};

// One pass of the guest's RAM sweep (sweep-ms=N): a read of every stampable
// page, timed with the guest's TSC. Passes are numbered from 1.
struct SweepPass {
  uint64_t number = 0, start_tsc = 0, end_tsc = 0;
};

// Longer than any real sweep pass (one over 64 GiB that re-faults every page
// takes minutes): a span beyond it is guest nonsense, not a duration.
inline constexpr uint64_t kMaxPlausiblePassUs = uint64_t{3600} * 1'000'000;

// TSC cycles at `tsc_khz` in us, without overflow (saturates); 0 without a rate.
[[nodiscard]] inline uint64_t tsc_to_us(uint64_t cycles, uint64_t tsc_khz) {
  if (tsc_khz == 0) return 0;
  const unsigned __int128 us = static_cast<unsigned __int128>(cycles) * 1000 / tsc_khz;
  return us > UINT64_MAX ? UINT64_MAX : static_cast<uint64_t>(us);
}

// A pass's duration. 0 for a span the TSC crossed backwards (a restore
// elsewhere), without a TSC frequency, or for a span no pass can take.
[[nodiscard]] inline uint64_t sweep_pass_us(const SweepPass& pass, uint64_t tsc_khz) {
  if (tsc_khz == 0 || pass.end_tsc <= pass.start_tsc) return 0;
  const uint64_t us = tsc_to_us(pass.end_tsc - pass.start_tsc, tsc_khz);
  return us <= kMaxPlausiblePassUs ? us : 0;
}

// Everything in the shared region is written by the guest (even the
// "config" part: nothing stops it), so every value read here is untrusted:
// each is read once, counts and ring indices are clamped to the rings, loops
// are bounded by the ring sizes or by the VMM's own vCPU count, and the TSC
// rate used for conversions is the VMM's own (configure/adopt), never the
// guest's copy.
class TestGuestLink {
 public:
  // `shared` is the VMM's mapping of the shared region.
  TestGuestLink(uint8_t* shared, uint64_t shared_size) : shared_size_(shared_size),
      shared_(reinterpret_cast<volatile vmm_guest_shared*>(shared)) {}

  // Fills the configuration before the first vCPU runs, and keeps the vCPU
  // count and TSC rate for the VMM's own use.
  void configure(uint32_t vcpus, uint64_t seed, uint64_t tsc_khz);
  // A VM restored from saved state: the guest was configured by an earlier
  // process; the VMM takes the vCPU count and TSC rate from what it knows
  // itself (the VM's configuration, the saved vCPU state) and writes nothing.
  void adopt(uint32_t vcpus, uint64_t tsc_khz);

  [[nodiscard]] GuestStatus status() const;
  // The guest's heartbeat counter (one read).
  [[nodiscard]] uint64_t heartbeat() const { return shared_->heartbeat; }
  // The VMM's own values (0 before configure/adopt), not the region's.
  [[nodiscard]] uint64_t tsc_khz() const { return tsc_khz_; }
  [[nodiscard]] uint32_t vcpus() const { return vcpus_; }
  // True once the guest has written anything: an arbitrary --kernel never does.
  [[nodiscard]] bool guest_speaks() const { return shared_->phase != VMM_GUEST_PHASE_BOOTING || shared_->heartbeat != 0; }

  // Asks every vCPU to verify its slice and waits for all answers. Waits for
  // stamping to finish first. Serialized: one verification at a time. An
  // answer that cannot be right (more mismatches than pages checked, counts
  // that overflow) is an error, not a result. Gives up with ECANCELED as
  // soon as `stop` is requested (a live update began, or the vmm is
  // shutting down).
  [[nodiscard]] Result<VerifyResult> verify(std::chrono::milliseconds timeout, std::stop_token stop = {});
  [[nodiscard]] std::optional<VerifyResult> last_verify() const;
  void set_last_verify(std::optional<VerifyResult> result);

  // What a live update carries: the last verification and the heartbeat now.
  [[nodiscard]] migration::TestDeviceState save() const;
  // Takes the last verification back (request 0: there was none). The
  // heartbeat lives in the shared region, which the update keeps.
  void restore(const migration::TestDeviceState& state);

  // An error naming why when the ring no longer holds heartbeat `since` (it
  // was overwritten, or the counter jumped), when the counter went back
  // below it, or for `since` 0 (heartbeat 0 has no ring entry): a gap
  // measured without it would be wrong. At most RING - 2 steps are read.
  [[nodiscard]] Result<HeartbeatGap> largest_gap_since(uint64_t since_heartbeat) const;

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
  uint32_t vcpus_ = 0;
  uint64_t tsc_khz_ = 0;
  std::mutex verify_mutex_;
  mutable std::mutex last_mutex_;
  std::optional<VerifyResult> last_verify_;
};

}  // namespace vmm::devices

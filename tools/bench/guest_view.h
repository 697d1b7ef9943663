// The test guest as the bench sees it from outside under QEMU: its status
// structure (guest/protocol.h), which the guest keeps in its own .bss when
// no VMM gives it a shared region, read from the guest RAM file on /dev/shm
// that QEMU maps (memory-backend-file,share=on). QEMU cannot tell the
// guest's heartbeat or RAM sweep; this view can, with the same definitions
// the vmm uses for its own guest_gap_us and brown-out.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tools/bench/common.h"

struct vmm_guest_shared;

namespace bench {

// One completed pass of the guest's RAM sweep, in guest TSC cycles.
struct SweepPass {
  uint64_t number = 0;  // from 1
  uint64_t start_tsc = 0;
  uint64_t end_tsc = 0;
  [[nodiscard]] uint64_t cycles() const { return end_tsc - start_tsc; }
};

struct StampCheck {
  int64_t pages_expected = 0;  // the guest's pages_total
  int64_t pages_intact = 0;    // pages whose word 0 is their stamp
  int64_t duration_us = 0;
  std::string layout;          // how file offsets were mapped to guest addresses
};

class GuestView {
 public:
  // Maps `ram_path` read-only; the file stays mapped (not copied) until the
  // view goes.
  static Result<GuestView> open(const std::string& ram_path, uint64_t ram_bytes);
  GuestView(GuestView&& other) noexcept;
  GuestView& operator=(GuestView&& other) noexcept;
  ~GuestView();

  // Finds the structure: an 8-byte aligned VMM_GUEST_MAGIC in the first
  // 16 MiB (the guest image is linked at 1 MiB) followed by protocol version
  // 1 and a plausible shared_size. The guest writes the magic last.
  Result<void> locate(std::chrono::milliseconds timeout);
  // The same guest after a copy to another file: the structure is where it was.
  void use_offset(uint64_t offset) { offset_ = offset; }
  [[nodiscard]] std::optional<uint64_t> offset() const { return offset_; }

  [[nodiscard]] uint64_t phase() const;
  [[nodiscard]] uint64_t pages_total() const;
  [[nodiscard]] uint64_t pages_stamped() const;  // vCPU 0's slice (all of it under QEMU: one vCPU)
  [[nodiscard]] uint64_t tsc_khz() const;        // 0 if the guest has not published it
  [[nodiscard]] uint64_t seed() const;
  [[nodiscard]] uint64_t heartbeat() const;
  // The TSC of heartbeat n, while it is still in the ring (the last 256).
  [[nodiscard]] uint64_t heartbeat_tsc(uint64_t n) const;
  // Whether this guest sweeps its RAM (sweep-ms) and this bench was built
  // with a guest/protocol.h that has the sweep ring.
  [[nodiscard]] bool has_sweep() const;
  [[nodiscard]] uint64_t sweep_passes() const;
  // The completed passes still in the ring, oldest first (a consistent
  // snapshot: re-read if the guest published a pass meanwhile).
  [[nodiscard]] std::vector<SweepPass> sweep_ring() const;

  // Checks word 0 of every page of the file against the page's stamp, read
  // while the guest runs (the stamp never changes once written). Pages are
  // mapped to guest addresses the way QEMU's microvm lays RAM out.
  [[nodiscard]] Result<StampCheck> check_stamps() const;

 private:
  GuestView(const uint8_t* base, uint64_t size) : base_(base), size_(size) {}
  [[nodiscard]] const volatile vmm_guest_shared* shared() const;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  std::optional<uint64_t> offset_;
};

// The host's TSC frequency, measured against CLOCK_MONOTONIC_RAW over
// `duration`. Under KVM the guest's TSC runs at the host's rate.
uint64_t calibrate_tsc_khz(std::chrono::milliseconds duration);
uint64_t read_tsc();

// The brown-out after a resume, by the definition the vmm uses for its own
// (LiveUpdate::measure_brownout): from the resume until the start of the
// first sweep pass that both starts after the resume and lasts at most
// `kBrownoutTolerance` times the baseline, the median of the last
// `kBaselinePasses` passes that ended before the stop.
inline constexpr double kBrownoutTolerance = 1.25;
inline constexpr size_t kBaselinePasses = 8;
// The baseline of `passes` (oldest first), as the vmm takes it: the last
// kBaselinePasses, sorted, the one at index n / 2.
std::optional<uint64_t> baseline_cycles(const std::vector<SweepPass>& passes);
// The first qualifying pass in `ring` (or nullopt while there is none yet).
std::optional<SweepPass> first_steady_pass(const std::vector<SweepPass>& ring, uint64_t resumed_tsc,
                                           uint64_t baseline_cycles);

}  // namespace bench

// The record of a live update, as query-live-update reports it. The old
// process starts it; the handover record carries it to the new process,
// which completes it.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace vmm {

struct UpdatePhase {
  std::string name;
  int64_t duration_us = 0;
};

// A guest page's physical frame (update/frames.h).
struct SampledFrame {
  uint32_t region = 0;
  uint64_t offset = 0, pfn = 0;
};

struct UpdateRecord {
  std::string status = "none";  // none | in-progress | completed | failed
  std::string mode;             // transfer | exec | kexec
  uint64_t generation = 0;      // updates this VM has survived
  std::vector<UpdatePhase> phases;
  std::optional<int64_t> blackout_us;
  std::optional<int64_t> guest_gap_us;
  std::optional<std::string> guest_gap_reason;  // why there is no guest_gap_us
  // The brown-out after the resume: until the guest's pass over its whole
  // RAM runs as fast as before the update (its sweep, guest option sweep-ms).
  // "pending" until known, then "measured" (brownout_us) or "unavailable"
  // (brownout_reason).
  std::optional<std::string> brownout_status;
  std::optional<int64_t> brownout_us;
  std::optional<int64_t> baseline_pass_us;
  std::optional<std::string> brownout_reason;
  std::optional<std::string> error;
  std::optional<std::string> failed_phase;  // the phase a failed update stopped in (listed last in phases)
  // The TSC rates across a kexec, when the new host's differs from the saved
  // one (each boot calibrates anew): saved, this host's, and the guest's now.
  std::optional<uint64_t> tsc_saved_khz, tsc_host_khz, tsc_khz;
  std::optional<std::string> tsc_note;
  // Sampled frames once the handover was prepared (carried, not shown), and
  // how many of those pages the new side found on the same frames (shown as
  // "frames": {"sampled", "same"}).
  std::vector<SampledFrame> frames_at_prepare;
  std::optional<uint64_t> frames_sampled, frames_same;
  // The vmm process that runs the VM after a completed update (a transfer
  // moves the VM to a new process; exec and kexec keep or restart the pid).
  std::optional<int64_t> pid;
  // CLOCK_MONOTONIC at the start of the blackout and of the handover (not
  // reported; carried to the new process, which ends both).
  int64_t blackout_started_ns = 0;
  int64_t handover_started_ns = 0;

  // What query-live-update shows.
  [[nodiscard]] nlohmann::json to_json() const;
  // What crosses to the new process: to_json() plus the clock readings.
  [[nodiscard]] nlohmann::json to_carried_json() const;
  // Reads either; unknown fields are ignored (a newer vmm may add some).
  [[nodiscard]] static Result<UpdateRecord> from_json(const nlohmann::json& json);
  void add_phase(std::string name, std::chrono::nanoseconds duration);
};

[[nodiscard]] int64_t monotonic_ns();
[[nodiscard]] int64_t realtime_ns();

}  // namespace vmm

// What one run of the blackout benchmark records.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace bench {

// The systems compared, in report order: our vmm's two live-update modes and
// QEMU's two ways of moving a guest to a new QEMU process.
inline const std::vector<std::string>& all_systems() {
  static const std::vector<std::string> systems{"vmm-exec", "vmm-transfer", "qemu-shared", "qemu-file"};
  return systems;
}
inline bool is_ours(const std::string& system) { return system.starts_with("vmm-"); }

struct Phase {
  std::string name;
  int64_t duration_us = 0;
};

// One live update (ours) or one handover to a new QEMU process (theirs).
struct Sample {
  std::string system;   // one of all_systems()
  std::string mode;     // exec | transfer | x-ignore-shared | file
  std::string size;     // RAM as given, e.g. "4G"
  uint64_t size_bytes = 0;
  uint32_t vcpus = 1;
  std::string backing;  // guest_memfd | memfd (ours), shm-file (QEMU)
  int update = 0;       // 1-based, per system, size and vCPU count
  bool ok = false;      // false: the update or its measurement failed (see notes)
  std::optional<int64_t> blackout_us;
  std::vector<Phase> phases;
  std::optional<int64_t> guest_gap_us;
  std::optional<int64_t> brownout_us;
  std::string brownout_status;  // measured | unavailable | timeout | not-run
  std::optional<int64_t> rss_anon_kib;  // of the (new) VMM process after the update
  std::string notes;

  void note(const std::string& text) { notes += (notes.empty() ? "" : "; ") + text; }
};

// A check of the guest's memory after a system's updates.
struct Verification {
  std::string system;
  std::string size;
  uint64_t size_bytes = 0;
  uint32_t vcpus = 1;
  std::string method;  // guest-verify | host stamp check
  int64_t pages_checked = -1;
  int64_t mismatches = -1;
  int64_t duration_us = -1;
  bool ok = false;
  std::string notes;
};

// Something that kept a measurement from being made.
struct Failure {
  std::string system;
  std::string size;
  uint32_t vcpus = 1;
  std::string message;
};

struct RunResults {
  std::vector<Sample> samples;
  std::vector<Verification> verifications;
  std::vector<Failure> failures;

  [[nodiscard]] bool failed() const;
};

inline bool RunResults::failed() const {
  if (!failures.empty()) return true;
  for (const auto& sample : samples)
    if (!sample.ok) return true;
  for (const auto& verification : verifications)
    if (!verification.ok) return true;
  return false;
}

}  // namespace bench

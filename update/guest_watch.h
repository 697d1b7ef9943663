// The guest's own view of a live update, watched from the process that
// resumed it: the guest gap (the longest interval between two of its
// heartbeats across the update) and the brown-out (how long until its pass
// over all of RAM runs as fast as before). Both read the test guest's shared
// region (guest/protocol.h) through the Machine's TestGuestLink, each in its
// own thread, and publish what they find through a callback.
//
// The shared region is guest-writable, so every value read from it is
// untrusted: the loops are bounded by time and by the rings (TestGuestLink),
// the TSC rate is the VMM's own, and a result the guest's data cannot
// support (a gap shorter than the freeze or longer than the time that has
// passed, a counter that went backwards) ends as "unavailable" with a reason
// instead of as a wrong number.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "machine/machine.h"

namespace vmm {

class GuestWatch {
 public:
  // Where the update left the guest. Guest TSCs are those of vCPU 0.
  struct ResumePoint {
    uint64_t heartbeat_at_save = 0;
    uint64_t guest_tsc_at_save = 0;
    uint64_t guest_tsc_at_resume = 0;  // after the clocks were moved on
    bool running = true;
  };

  // What the watch has found so far; the fields of the update record it owns.
  struct Findings {
    std::optional<int64_t> guest_gap_us;
    // Why there is no guest_gap_us, once it is known there will be none.
    std::optional<std::string> guest_gap_reason;
    // "pending" until known, then "measured" (brownout_us) or "unavailable"
    // (brownout_reason).
    std::optional<std::string> brownout_status;
    std::optional<int64_t> brownout_us;
    std::optional<int64_t> baseline_pass_us;
    std::optional<std::string> brownout_reason;
  };
  // Called, from the watch's threads, with all the findings after each change.
  using Publish = std::function<void(const Findings&)>;

  GuestWatch(Machine& machine, Publish publish) : machine_(machine), publish_(std::move(publish)) {}
  GuestWatch(const GuestWatch&) = delete;
  GuestWatch& operator=(const GuestWatch&) = delete;
  ~GuestWatch() { stop(); }

  // Right after the resume: starts both measurements (once per process).
  void start(ResumePoint point);
  // Ends both measurements and waits for their threads.
  void stop();
  [[nodiscard]] Findings findings() const;

 private:
  void measure_guest_gap(ResumePoint point);
  void measure_brownout(ResumePoint point);
  void set_guest_gap(int64_t us);
  void set_guest_gap_unavailable(std::string reason);
  void set_baseline(int64_t us);
  void set_brownout(std::string status, std::optional<int64_t> us, std::optional<std::string> reason);
  // Publishes the findings after `change` updated them.
  void update(const std::function<void(Findings&)>& change);

  Machine& machine_;
  Publish publish_;
  mutable std::mutex mutex_;  // guards findings_ and orders publish_ calls
  Findings findings_;
  std::thread gap_thread_;
  std::thread brownout_thread_;
  std::atomic<bool> stopping_{false};
};

}  // namespace vmm

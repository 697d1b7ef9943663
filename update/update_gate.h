// Where a coordinated kexec update (one host kexec for every VM on the
// host, driven by `vmmctl host-update`) waits for its coordinator:
//
//   freeze  prepared (session filled, guest running): go on to the freeze
//           only when every other VM on the host has prepared too
//   kexec   frozen (state saved, record preserved): the coordinator kexecs
//           the host once every VM is frozen; nothing ever comes back here
//           but a cancel
//
// At either gate the update ends with a cancel (`live-update-cancel`), the
// coordinator's connection closing (it died: no kexec can follow), or the
// vmm shutting down; the orchestrator then cancels and resumes the guest.
// Commands on other connections go through while an update waits here.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>

#include "base/result.h"

namespace vmm {

class UpdateGate {
 public:
  enum class Stop { none, freeze, kexec };

  // A coordinated update runs from begin() to end(): a cancel in between is
  // kept for its next gate (it may come while the vCPUs are being paused).
  void begin();
  void end();

  // The update waiting at `stop` until a decision. Returns on `proceed()`
  // (freeze only) and fails with ECANCELED on `cancel()`, `cancelled`, or
  // `coordinator_fd` (the requesting connection, -1: none) hanging up.
  [[nodiscard]] Result<void> wait_at(Stop stop, int coordinator_fd, const std::atomic<bool>& cancelled);

  // live-update-continue: let an update waiting at the freeze gate freeze.
  [[nodiscard]] Result<void> proceed();
  // live-update-cancel: end a coordinated update at its next gate.
  [[nodiscard]] Result<void> cancel(std::string reason);

  // Where an update waits now (none: it does not).
  [[nodiscard]] Stop waiting() const;

 private:
  enum class Decision { none, proceed, cancel };
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  bool active_ = false;
  Stop waiting_ = Stop::none;
  Decision decision_ = Decision::none;
  std::string cancel_reason_;
};

[[nodiscard]] const char* to_string(UpdateGate::Stop stop);

}  // namespace vmm

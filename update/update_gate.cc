#include "update/update_gate.h"

#include <poll.h>

#include <fmt/format.h>

namespace vmm {

namespace {

// The coordinator's connection closed: POLLRDHUP on a stream socket, or an
// error on it. Data waiting to be read (a pipelined request) is not a hangup.
bool hung_up(int fd) {
  if (fd < 0) return false;
  pollfd poll_fd{fd, POLLRDHUP, 0};
  if (::poll(&poll_fd, 1, 0) <= 0) return false;
  return (poll_fd.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

}  // namespace

const char* to_string(UpdateGate::Stop stop) {
  switch (stop) {
    case UpdateGate::Stop::none: return "none";
    case UpdateGate::Stop::freeze: return "freeze";
    case UpdateGate::Stop::kexec: return "kexec";
  }
  return "none";
}

void UpdateGate::begin() {
  std::lock_guard lock(mutex_);
  active_ = true;
  waiting_ = Stop::none;
  decision_ = Decision::none;
  cancel_reason_.clear();
}

void UpdateGate::end() {
  std::lock_guard lock(mutex_);
  active_ = false;
  waiting_ = Stop::none;
  decision_ = Decision::none;
}

Result<void> UpdateGate::wait_at(Stop stop, int coordinator_fd, const std::atomic<bool>& cancelled) {
  using namespace std::chrono_literals;
  std::unique_lock lock(mutex_);
  waiting_ = stop;
  // A cancel stands until the update ends; a proceed is only ever given to
  // a waiting freeze gate, which takes it.
  while (true) {
    if (decision_ == Decision::cancel) {
      std::string reason = cancel_reason_;
      waiting_ = Stop::none;
      return fail(fmt::format("cancelled by the coordinator at the {} gate: {}", to_string(stop), reason),
                  ECANCELED);
    }
    if (decision_ == Decision::proceed) {
      waiting_ = Stop::none;
      decision_ = Decision::none;
      return {};
    }
    if (cancelled) {
      waiting_ = Stop::none;
      return fail(fmt::format("the vmm is shutting down while waiting at the {} gate", to_string(stop)), ECANCELED);
    }
    // Checked without the lock: poll() is a system call, and nothing here
    // needs the data to stay still meanwhile.
    lock.unlock();
    const bool gone = hung_up(coordinator_fd);
    lock.lock();
    if (gone) {
      waiting_ = Stop::none;
      return fail(fmt::format("the coordinator's connection closed while this VM waited at the {} gate: no host "
                              "kexec can follow",
                              to_string(stop)),
                  ECANCELED);
    }
    changed_.wait_for(lock, 20ms);
  }
}

Result<void> UpdateGate::proceed() {
  std::lock_guard lock(mutex_);
  if (waiting_ != Stop::freeze)
    return fail(waiting_ == Stop::none
                    ? "no coordinated live update is waiting to freeze: start one with live-update "
                      "{\"mode\": \"kexec\", \"coordinated\": true}"
                    : "this VM is frozen already and waits for the host's kexec: nothing is left to continue "
                      "(live-update-cancel resumes it)",
                EINVAL);
  decision_ = Decision::proceed;
  changed_.notify_all();
  return {};
}

Result<void> UpdateGate::cancel(std::string reason) {
  std::lock_guard lock(mutex_);
  if (!active_)
    return fail("no coordinated live update is in progress: there is nothing to cancel (an update that is not "
                "coordinated cancels itself on failure)",
                EINVAL);
  decision_ = Decision::cancel;
  cancel_reason_ = reason.empty() ? "no reason given" : std::move(reason);
  changed_.notify_all();
  return {};
}

UpdateGate::Stop UpdateGate::waiting() const {
  std::lock_guard lock(mutex_);
  return waiting_;
}

}  // namespace vmm

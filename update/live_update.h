// The live update's orchestrator: every mode runs through the same phases,
// and each mode is one Handover (handover.h):
//
//   prepare   (guest running) the handover sets up the new side: a new vmm
//             process (transfer), a LUO session with every memory file
//             (exec, kexec), the new kernel (kexec)
//   freeze    pause every vCPU (the blackout starts) and save the whole state
//             into the buffer the handover prepared
//   handover  the handover carries the VM to the new side
//   restore   in the new process (vmm/runtime.h, one path for all modes):
//             rebuild the VM around the same pages, resume (the blackout ends)
//   finish    FINISH the LUO session
//
// The update is a state of the machine (Machine::begin_update): while it
// runs, stop, cont, guest-verify and quit are refused. A failure before the
// handover cancels the mode's preparations and resumes the guest; guest
// memory is never touched. See docs/live-update.md.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "machine/machine.h"
#include "update/guest_watch.h"
#include "update/handover.h"
#include "update/handover_record.h"
#include "update/record.h"
#include "vmm/control/handler.h"

namespace vmm {

namespace control {
class Server;
}

class LiveUpdate {
 public:
  LiveUpdate(Machine& machine, LaunchOptions launch, UpdateRecord last = {});
  ~LiveUpdate();

  // The server whose listening socket goes to the new vmm.
  void set_control_server(control::Server* server) { server_ = server; }
  [[nodiscard]] bool in_progress() const { return machine_.update_in_progress(); }
  [[nodiscard]] nlohmann::json query() const;
  // What a kexec live update of this VM can do on this kernel
  // (kexec_support.h): probed once per process, so a management tool can
  // decide before it asks. Waits at most a second for a busy /dev/liveupdate.
  [[nodiscard]] nlohmann::json kexec_capability() const;

  // live-update: runs prepare, freeze and handover on the caller's thread.
  // An exec that succeeds never returns, and a transfer that succeeds marks
  // the connection handed over: either way the new process replies to the
  // client on the connection in `context`. Every failure returns an error
  // that says what became of the guest.
  control::CommandResult run(const nlohmann::json& arguments, const control::CommandContext& context);
  // The vmm is shutting down: an update in progress stops waiting for its
  // new side and fails (it is cancelled, never left half-done).
  void cancel();
  // A coordinated kexec update (update_gate.h): live-update-continue lets
  // it freeze, live-update-cancel ends it and resumes the guest.
  [[nodiscard]] Result<void> continue_coordinated() { return gate_.proceed(); }
  [[nodiscard]] Result<void> cancel_coordinated(std::string reason) { return gate_.cancel(std::move(reason)); }

  // In a restored process, right after the resume: measures the guest's own
  // view of the gap once it has beaten again (its heartbeat ring is short),
  // and the brown-out (guest_watch.h).
  using ResumePoint = GuestWatch::ResumePoint;
  void watch_after_resume(ResumePoint point);
  // In a restored process: the update that brought it here, completed.
  void record_completed(UpdateRecord record);
  // A transfer committed: the VM, the control socket and the requesting
  // connection belong to the new process; this one only exits.
  [[nodiscard]] bool handed_over() const { return handed_over_.load(); }
  // After handed_over(): the pid that now runs the VM.
  [[nodiscard]] pid_t successor() const { return successor_.load(); }

 private:
  [[nodiscard]] Result<UpdateRequest> parse(const nlohmann::json& arguments) const;
  void finish_record(UpdateRecord record);
  // Copies what the guest watch found into the record.
  void publish_watch(const GuestWatch::Findings& found);

  Machine& machine_;
  LaunchOptions launch_;
  control::Server* server_ = nullptr;
  std::atomic<bool> handed_over_{false};
  std::atomic<pid_t> successor_{0};
  std::atomic<bool> cancelled_{false};
  UpdateGate gate_;
  mutable std::mutex record_mutex_;
  UpdateRecord record_;
  GuestWatch::Findings findings_;  // the latest the watch published
  // Last: its threads publish into record_, so it stops first.
  GuestWatch watch_;
};

}  // namespace vmm

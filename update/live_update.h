// The live update: keep the guest's memory in place while the VMM binary
// (exec mode) or the host kernel (kexec mode) is replaced underneath it.
//
//   prepare  (guest running) create a LUO session named after the VM and
//            preserve the VM fd, every memory region's fd and a pre-sized
//            state memfd, each under its own token;
//   freeze   pause every vCPU (the blackout starts) and save the whole state
//            into the state memfd;
//   handover execve the new vmm in restore mode (or kexec);
//   restore  in the new process (restore.h): retrieve by token, rebuild the
//            VM around the same pages, resume (the blackout ends);
//   finish   FINISH the session.
//
// A failure before the handover cancels the session and resumes the guest;
// guest memory is never touched. See docs/live-update.md.
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
#include "vmm/control/handler.h"
#include "machine/machine.h"

namespace vmm {

namespace control {
class Server;
}

// Tokens in the VM's session. Regions get kFirstRegionToken + their index.
inline constexpr uint64_t kVmToken = 1;
inline constexpr uint64_t kStateToken = 2;
inline constexpr uint64_t kFirstRegionToken = 16;

struct UpdatePhase {
  std::string name;
  int64_t duration_us = 0;
};

// The last live update, as query-live-update reports it. The exec handover
// carries it to the new process, which completes it.
struct UpdateRecord {
  std::string status = "none";  // none | in-progress | completed | failed
  std::string mode;             // transfer | exec | kexec
  uint64_t generation = 0;      // updates this VM has survived
  std::vector<UpdatePhase> phases;
  std::optional<int64_t> blackout_us;
  std::optional<int64_t> guest_gap_us;
  // The brown-out after the resume: until the guest's pass over its whole
  // RAM runs as fast as before the update (its sweep, guest option sweep-ms).
  // "pending" until known, then "measured" (brownout_us) or "unavailable"
  // (brownout_reason).
  std::optional<std::string> brownout_status;
  std::optional<int64_t> brownout_us;
  std::optional<int64_t> baseline_pass_us;
  std::optional<std::string> brownout_reason;
  std::optional<std::string> error;
  // The vmm process that runs the VM after a completed update (a transfer
  // moves the VM to a new process; exec and kexec keep or restart the pid).
  std::optional<int64_t> pid;
  // CLOCK_MONOTONIC at the start of the blackout and of the handover.
  int64_t blackout_started_ns = 0;
  int64_t handover_started_ns = 0;

  [[nodiscard]] nlohmann::json to_json() const;
  [[nodiscard]] static Result<UpdateRecord> from_json(const nlohmann::json& json);
  void add_phase(std::string name, std::chrono::nanoseconds duration);
};

// Faults a test can inject through the "x-inject" argument of live-update.
enum class Fault {
  none,
  preserve_refused,  // prepare: preserve a file the backend has no handler for
  state_too_large,   // freeze: a state memfd too small for the state
  corrupt_state,     // restore: the new process sees a corrupted state blob
  wrong_token,       // restore: the new process asks for a region by a wrong token
  wrong_vm_token,    // restore: a guest_memfd's VM token does not match the VM
  target_refuses,    // transfer prepare: the new process reports it cannot build the VM
  target_crash,      // transfer handover: the new process dies after receiving the state
};
[[nodiscard]] Result<Fault> fault_from_string(std::string_view name);
[[nodiscard]] std::string_view to_string(Fault fault);

// What the new vmm needs besides the session: how this one was started.
struct RelaunchOptions {
  std::string control_socket_path;
  std::string console = "stdout";
  std::string log_level = "info";
  std::string kvm_device = "/dev/kvm";
};

[[nodiscard]] int64_t monotonic_ns();
[[nodiscard]] int64_t realtime_ns();
// This process's own binary (what an exec update runs by default).
[[nodiscard]] std::string own_binary();

class LiveUpdate {
 public:
  LiveUpdate(Machine& machine, RelaunchOptions relaunch, UpdateRecord last = {});
  ~LiveUpdate();

  // The server whose listening socket crosses the exec.
  void set_control_server(control::Server* server) { server_ = server; }
  [[nodiscard]] bool in_progress() const { return machine_.update_in_progress(); }
  [[nodiscard]] nlohmann::json query() const;

  // live-update: runs prepare, freeze and handover on the caller's thread.
  // An exec that succeeds never returns, and a transfer that succeeds marks
  // the connection handed over: either way the new process replies to the
  // client on the connection in `context`. Every failure returns an error
  // with the guest running again (if it was) and its memory untouched.
  control::CommandResult run(const nlohmann::json& arguments, const control::CommandContext& context);

  // In a restored process, right after the resume: measures the guest's own
  // view of the gap once it has beaten again (its heartbeat ring is short),
  // and the brown-out. Guest TSCs are those of vCPU 0.
  struct ResumePoint {
    uint64_t heartbeat_at_save = 0;
    uint64_t guest_tsc_at_save = 0;
    uint64_t guest_tsc_at_resume = 0;  // after the clocks were moved on
    bool running = true;
  };
  void watch_after_resume(ResumePoint point);
  // In a restored process: the update that brought it here, completed.
  void record_completed(UpdateRecord record);
  // A transfer committed: the VM, the control socket and the requesting
  // connection belong to the new process; this one only exits.
  [[nodiscard]] bool handed_over() const { return handed_over_.load(); }

 private:
  struct Request {
    std::string mode;
    std::string binary;
    std::string kernel, initrd, cmdline;
    bool prefault = true;  // transfer: fill the new process's page tables for guest RAM first
    Fault fault = Fault::none;
  };
  struct Attempt;
  [[nodiscard]] Result<Request> parse(const nlohmann::json& arguments) const;
  control::CommandResult run_luo(Attempt& attempt, const control::CommandContext& context);
  control::CommandResult run_transfer(Attempt& attempt, const control::CommandContext& context);
  // The record as the new process receives it, with the clock readings.
  [[nodiscard]] static nlohmann::json carried_record(const UpdateRecord& record);
  // --console, --log-level and --kvm-device as this process got them.
  [[nodiscard]] std::vector<std::string> relaunch_args() const;
  void finish_record(UpdateRecord record);
  void measure_guest_gap(uint64_t heartbeat_at_save);
  void measure_brownout(ResumePoint point);
  void set_brownout(std::string status, std::optional<int64_t> us, std::optional<std::string> reason);

  Machine& machine_;
  RelaunchOptions relaunch_;
  control::Server* server_ = nullptr;
  std::atomic<bool> handed_over_{false};
  mutable std::mutex record_mutex_;
  UpdateRecord record_;
  std::thread gap_thread_;
  std::thread brownout_thread_;
  std::atomic<bool> stopping_{false};
};

}  // namespace vmm

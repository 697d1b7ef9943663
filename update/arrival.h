// The new side of a live update, up to the moment before the guest runs: each
// mode rebuilds the VM its own way and ends in one Arrival, which the one
// completion path (vmm/runtime.h) runs: serve the socket, commit, resume,
// report, reply.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "luo/session.h"
#include "machine/machine.h"
#include "update/faults.h"
#include "update/handover_record.h"
#include "update/live_update.h"

namespace vmm {

struct Arrival {
  std::unique_ptr<Machine> machine;
  HandoverRecord handover;      // mode, launch options, reply id, the update so far
  UniqueFd listening_socket;    // the control socket, handed over (or none)
  UniqueFd connection;          // the connection owed the reply (or none)
  LiveUpdate::ResumePoint resume_point;
  bool was_running = true;
  // Where the "restore" phase began (it ends at the resume).
  std::chrono::steady_clock::time_point restore_started = std::chrono::steady_clock::now();
  // The new side takes the VM: transfer waits for "go". Called before the
  // resume; a failure means this process must not run the guest.
  std::function<Result<void>()> commit;
  // After the resume: transfer says "resumed"; LUO modes FINISH the session
  // (and add the "finish" phase to the record).
  std::function<void(UpdateRecord&)> after_resume;
  // Exec and kexec: fill this process's page tables for guest RAM after the resume.
  bool prefault_after_resume = false;
  // Gives up before the guest ran here: each mode's own way (the old process
  // resumes; a rollback to the previous binary; the session stays held).
  // Returns the process's exit status.
  std::function<int(const Error&)> give_up;
  // Whatever must live as long as the VM runs here (the channel, the session).
  std::shared_ptr<void> keep_alive;
};

// The console and KVM device of a MachineConfig, as the vmm was launched.
void apply_launch(const LaunchOptions& launch, MachineConfig& config);

// `vmm transfer-target --channel-fd N`: builds the VM before the pause and
// loads the state after it. A failure is reported to the old process, which
// resumes its own VM; it returns the exit status then.
struct TransferArrivalOptions {
  int channel_fd = -1;
  LaunchOptions launch;
};
[[nodiscard]] std::variant<Arrival, int> arrive_by_transfer(const TransferArrivalOptions& options);

// `vmm restore`: after an exec (`--handover-fd N`) or a kexec (`--session NAME`).
struct LuoArrivalOptions {
  std::string session;            // kexec: the session to retrieve
  int handover_fd = -1;           // exec: the handover record
  std::string previous_failure;   // set in a rollback: the update that failed
  int luo_manifest_fd = -1;       // set in a rollback: the manifest pass_on wrote anew
  LaunchOptions launch;           // kexec: as given on the command line
  Fault fault = Fault::none;      // kexec, faults build only: `--x-inject` on the command line
  // `vmm run` started by systemd with the VM's files in $LISTEN_FDS
  // (update/fd_store.h): the session comes from there, not from LUO.
  std::shared_ptr<luo::Backend> fd_store;
};
[[nodiscard]] std::variant<Arrival, int> arrive_by_luo(const LuoArrivalOptions& options);

// `vmm restore --session NAME --discard`: finishes the session without a
// restore, from the kernel or from the holders of a failed restore
// (session_holder.h). The guest's memory goes. Returns the exit status.
[[nodiscard]] int discard_luo_session(const std::string& name);

// The old vmm's binary runs again with everything as it was handed over
// (the exec handover's rollback), with `failure` as the reason. Returns only
// if that exec failed.
// `other_fds` (the control socket, the connection) cross too.
[[nodiscard]] Error roll_back(int handover_fd, int rollback_fd, const std::vector<int>& other_fds,
                              const std::string& failure);

}  // namespace vmm

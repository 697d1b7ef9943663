// One live-update mode's handover: how the VM gets from this vmm to the
// next one. The orchestrator (live_update.h) runs every mode through the
// same phases and calls these in order:
//
//   prepare    guest running: start or load what the mode needs (a new
//              process, a LUO session, the new kernel) and return the
//              buffer the freeze writes the saved state into
//   (freeze)   the orchestrator pauses the vCPUs and saves the state
//   hand_over  give the VM to the new side. exec and kexec return only on
//              failure; transfer returns once the new process owns the VM
//   cancel     on any failure before the VM was handed over: release
//              everything prepare set up (the orchestrator then resumes)
#pragma once

#include <atomic>
#include <memory>
#include <span>
#include <string>

#include "base/result.h"
#include "machine/machine.h"
#include "update/faults.h"
#include "update/handover_record.h"
#include "update/record.h"
#include "update/update_gate.h"
#include "vmm/control/handler.h"

namespace vmm {

namespace control {
class Server;
}

// live-update's arguments, checked.
struct UpdateRequest {
  std::string mode;    // transfer | exec | kexec | fdstore
  std::string binary;  // exec, transfer: the new vmm
  std::string kernel, initrd, cmdline;  // kexec
  bool prefault = true;  // transfer: fill the new process's page tables for guest RAM before the pause
  // kexec: one of many VMs in one host kexec (`vmmctl host-update`): wait at
  // the freeze and kexec gates (update_gate.h); the coordinator loads and
  // executes the kexec.
  bool coordinated = false;
  FaultPlan faults;      // faults build only
};

// What a handover sees of the update in progress.
struct HandoverContext {
  Machine& machine;
  const UpdateRequest& request;
  const LaunchOptions& launch;
  control::Server* server;                 // null: no control socket
  const control::CommandContext& command;  // the requesting connection
  UpdateRecord& record;
  const std::atomic<bool>& cancelled;      // the vmm is shutting down: give up waiting
  UpdateGate& gate;                        // a coordinated update's waits
};

// What prepare() sets up for the freeze.
struct PreparedHandover {
  std::span<uint8_t> state_buffer;  // the saved state goes here
  // The VM fd's token in the mode's LUO session; 0 when the VM is not in it
  // (a kernel without a KVM LUO handler): the new side then builds a new VM
  // around the memory files.
  uint64_t vm_luo_token = 0;
};

class Handover {
 public:
  Handover() = default;
  Handover(const Handover&) = delete;
  Handover& operator=(const Handover&) = delete;
  virtual ~Handover() = default;

  [[nodiscard]] virtual Result<PreparedHandover> prepare(HandoverContext& context) = 0;
  // The state is in the buffer prepare returned, `state_bytes` long.
  [[nodiscard]] virtual Result<void> hand_over(HandoverContext& context, size_t state_bytes) = 0;
  virtual void cancel(HandoverContext& context) = 0;
  // After a successful hand_over: the pid that now runs the VM (0: none
  // yet, the VM waits in systemd's fd store).
  [[nodiscard]] virtual pid_t successor() const = 0;
};

[[nodiscard]] std::unique_ptr<Handover> make_exec_handover();
[[nodiscard]] std::unique_ptr<Handover> make_kexec_handover();
[[nodiscard]] std::unique_ptr<Handover> make_transfer_handover();
[[nodiscard]] std::unique_ptr<Handover> make_fd_store_handover();

// Tokens in the VM's LUO session. Regions get kFirstRegionToken + their index.
inline constexpr uint64_t kVmToken = 1;
inline constexpr uint64_t kStateToken = 2;
inline constexpr uint64_t kRecordToken = 3;  // kexec: the handover record
inline constexpr uint64_t kFirstRegionToken = 16;

// This process's own binary (what exec and transfer run by default).
[[nodiscard]] std::string own_binary();

}  // namespace vmm

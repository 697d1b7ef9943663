// A running virtual machine: the facade over its VM core (KVM VM, guest
// memory), its vCPU set and its devices, which MachineBuilder builds.
// Paused, resumed and stopped by the control socket, signals, the guest, or
// a live update (UpdateLease).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "kvm/system.h"
#include "kvm/vm.h"
#include "memory/guest_memory.h"
#include "migration/saved_state.h"
#include "machine/device_set.h"
#include "machine/devices/test_guest.h"
#include "machine/vcpu_set.h"
#include "machine/vcpu_thread.h"
#include "machine/vm_core.h"

namespace vmm {

enum class ConsoleKind { stdout_console, none, file };

struct MachineConfig {
  std::string name;  // names the VM (and its live-update session)
  uint64_t ram_size = 256ULL << 20;
  uint64_t shared_size = memory::kDefaultSharedSize;
  uint32_t vcpus = 1;
  memory::Backing ram_backing = memory::Backing::guest_memfd;
  std::optional<std::string> kernel_path;  // empty: the embedded test guest
  std::string cmdline;
  ConsoleKind console = ConsoleKind::stdout_console;
  std::string console_path;
  std::string kvm_path = "/dev/kvm";
};

// What a restore builds a VM from: a new, empty VM, the files of every memory
// region (in the order of state.memory) and the saved state.
struct RestoreInputs {
  UniqueFd vm_fd;  // invalid: a new VM is created (the memory is all memfd)
  std::vector<UniqueFd> region_files;
  memory::SlotKind guest_memfd_slot_kind = memory::SlotKind::guest_memfd;
  migration::SavedState state;
};

// What a transfer live update builds a VM from ahead of the pause: the
// memory files and layout of the running VM, handed over by the old vmm.
struct PrebuildInputs {
  memory::MemoryLayout layout;
  std::vector<UniqueFd> region_files;  // in layout order
  memory::SlotKind guest_memfd_slot_kind = memory::SlotKind::userspace;
  // Fill this process's page tables for guest RAM ahead of time, so KVM's
  // re-faults after the resume skip the host page fault (the brown-out).
  bool prefault = true;
  // Each vCPU's CPUID as the running VM has it (empty: set at load_state):
  // set now, it need not be set again inside the blackout.
  std::vector<std::vector<kvm_cpuid_entry2>> cpuid;
};

inline constexpr uint32_t kMaxVcpus = 32;  // the test guest protocol's limit

enum class RunState { running, paused, shutdown };
[[nodiscard]] const char* to_string(RunState state);

struct RegionInfo {
  std::string name;
  uint64_t gpa = 0, size = 0;
  memory::Backing backing{};
  memory::SlotKind slot_kind{};
  uint64_t inode = 0, device = 0;
};

// Receives events for the control socket: QMP name and data.
using EventSink = std::function<void(const std::string& name, const nlohmann::json& data)>;

class Machine;

// The update state of a Machine, held by the one live update in progress.
// While it lives, Machine::pause()/resume() and the commands that would run,
// stop, verify or quit the guest are refused with EBUSY; only the lease's own
// pause()/resume() move the vCPUs. Move-only; at most one exists per Machine
// (Machine::begin_update). The destructor or end() leaves the update state.
class UpdateLease {
 public:
  UpdateLease(UpdateLease&& other) noexcept : machine_(std::exchange(other.machine_, nullptr)) {}
  UpdateLease& operator=(UpdateLease&& other) noexcept;
  UpdateLease(const UpdateLease&) = delete;
  UpdateLease& operator=(const UpdateLease&) = delete;
  ~UpdateLease() { end(); }

  // Machine::pause()/resume() for the update itself.
  [[nodiscard]] Result<std::chrono::microseconds> pause(
      std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));
  [[nodiscard]] Result<void> resume();
  // Leaves the update state; the lease is empty afterwards. Idempotent.
  void end();
  // The VM now runs elsewhere (a committed transfer): the lease is released
  // but the machine stays in the update state, refusing every command that
  // would move the frozen copy, until it stops.
  void hand_over() { machine_ = nullptr; }
  [[nodiscard]] bool active() const { return machine_ != nullptr; }

 private:
  friend class Machine;
  explicit UpdateLease(Machine& machine) : machine_(&machine) {}
  Machine* machine_ = nullptr;
};

class Machine final : public VcpuExitHandler {
 public:
  // Validates the configuration and builds the whole VM, vCPUs parked. On
  // failure nothing is left behind.
  [[nodiscard]] static Result<std::unique_ptr<Machine>> create(const MachineConfig& config);
  // Rebuilds a VM from saved state around the same memory files, vCPUs
  // parked; never writes guest memory. `config` supplies what is not part of
  // the state (console, KVM device); the rest comes from the state.
  [[nodiscard]] static Result<std::unique_ptr<Machine>> restore(MachineConfig config, RestoreInputs inputs);
  // Builds an empty VM (irqchip, memslots on the given files, vCPUs with
  // their threads parked) for a state that load_state() supplies later: the
  // expensive part of a restore, done while the old VM still runs. Never
  // writes guest memory. `config` names the VM and its vCPU count.
  [[nodiscard]] static Result<std::unique_ptr<Machine>> prebuild(MachineConfig config, PrebuildInputs inputs);
  // Loads saved state into a VM from prebuild() whose layout and vCPU count
  // match it; only while paused, and the vCPUs stay parked (resume() runs them).
  [[nodiscard]] Result<void> load_state(const migration::SavedState& state);
  // After load_state(), when this host's TSC rate differs from the saved one
  // (see load_state in machine.cc): the saved rate, this host's, and the one
  // the guest now runs at (the saved one where KVM can run it, else the
  // host's). nullopt when the rates are the same.
  struct TscRateChange {
    uint64_t saved_khz = 0, host_khz = 0, khz = 0;
  };
  [[nodiscard]] std::optional<TscRateChange> tsc_rate_change() const { return tsc_rate_change_; }

  // The VM's whole state (VM, vCPUs, devices, memory layout); only while
  // paused (needs no lease). Region tokens are left for the caller to fill in.
  [[nodiscard]] Result<migration::SavedState> save_state();
  [[nodiscard]] FdRef vm_fd() const { return core_.vm.fd(); }
  ~Machine() override;

  // Starts the vCPU threads of a VM from create(), running the guest or
  // parked. (restore() and prebuild() start them parked themselves.)
  [[nodiscard]] Result<void> start(bool running = true);
  // Parks every vCPU; returns how long that took. Bounded by `timeout`.
  // Refused (EBUSY) while a live update holds the machine, and fails
  // (ECANCELED, vCPUs left parked) if a shutdown was requested meanwhile.
  [[nodiscard]] Result<std::chrono::microseconds> pause(
      std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));
  // Runs every vCPU again. Refused (EBUSY) while a live update holds the
  // machine, and once a shutdown was requested.
  [[nodiscard]] Result<void> resume();
  [[nodiscard]] RunState run_state() const;

  // Enters the update state atomically, after any pause or resume in flight:
  // fails with EBUSY if a live update already holds the machine, or if the
  // machine is shutting down. A guest-verify in flight gives up with EBUSY.
  [[nodiscard]] Result<UpdateLease> begin_update();
  [[nodiscard]] bool update_in_progress() const;

  // Asks the main loop to shut the VM down (from any thread); idempotent.
  // For the guest, signals and the VMM itself: never refused.
  void request_shutdown(const std::string& reason, bool by_guest);
  // The control socket's quit: refused with EBUSY during a live update (the
  // update would carry a VM that is going away), else request_shutdown().
  [[nodiscard]] Result<void> quit(const std::string& reason);
  // Asks the guest to verify its memory (guest-verify): only while running,
  // refused with EBUSY during a live update and given up (EBUSY) if one
  // starts meanwhile.
  [[nodiscard]] Result<devices::VerifyResult> verify_guest(std::chrono::milliseconds timeout,
                                                          std::stop_token shutting_down = {});
  // Readable once a shutdown was requested (for poll()).
  [[nodiscard]] FdRef shutdown_fd() const { return shutdown_event_.ref(); }
  [[nodiscard]] std::string shutdown_reason() const;
  [[nodiscard]] bool shutdown_failed() const;
  // Stops every vCPU thread for good and flushes the console.
  void stop();
  void flush_console();

  // Fills this process's page tables for guest memory in the background
  // while the guest runs (after an exec restore, where doing it before the
  // resume would lengthen the blackout). stop() ends it.
  void prefault_in_background();

  // Each vCPU's CPUID as last set (for a transfer's new process to preset).
  [[nodiscard]] std::vector<std::vector<kvm_cpuid_entry2>> vcpu_cpuid() const;

  [[nodiscard]] std::vector<RegionInfo> memory_info() const;
  [[nodiscard]] std::vector<VcpuInfo> vcpu_info() const;
  [[nodiscard]] devices::TestGuestLink& guest() { return devices_->guest(); }
  [[nodiscard]] const MachineConfig& config() const { return config_; }
  [[nodiscard]] const memory::GuestMemory& memory() const { return core_.memory; }
  [[nodiscard]] std::optional<std::chrono::microseconds> last_pause_latency() const;

  void set_event_sink(EventSink sink);
  void emit_event(const std::string& name, const nlohmann::json& data);

  // The error of everything refused while a live update holds the machine.
  [[nodiscard]] static Error busy_updating(std::string_view what);

  // VcpuExitHandler
  void io_in(uint16_t port, std::span<uint8_t> data) override;
  Next io_out(uint16_t port, std::span<const uint8_t> data) override;
  void mmio_read(uint64_t address, std::span<uint8_t> data) override;
  void mmio_write(uint64_t address, std::span<const uint8_t> data) override;
  void guest_system_event(uint32_t vcpu, uint32_t type) override;
  void vcpu_failed(uint32_t vcpu, const std::string& why) override;

 private:
  friend class UpdateLease;
  // pause()/resume() with the operation lock held and the lease checked.
  [[nodiscard]] Result<std::chrono::microseconds> pause_vcpus(std::chrono::milliseconds timeout);
  [[nodiscard]] Result<void> resume_vcpus();
  void end_update();
  // The SHUTDOWN event, the log line and the eventfd; no lock held.
  void announce_shutdown(const std::string& reason, bool by_guest);
  // "the VM has shut down" / "the VM is shutting down (...)"; data lock held.
  [[nodiscard]] std::optional<Error> refuse_if_shutting_down_locked() const;

  friend class MachineBuilder;
  Machine(MachineConfig config, VmCore core, UniqueFd shutdown_event);

  MachineConfig config_;
  VmCore core_;
  UniqueFd shutdown_event_;
  std::optional<TscRateChange> tsc_rate_change_;  // written only by load_state, vCPUs parked
  std::unique_ptr<DeviceSet> devices_;
  VcpuSet vcpus_;  // after the devices: its threads go first

  // Locking (docs/architecture.md, "Locks"): operation_mutex_ serializes
  // what changes the vCPUs (start, pause, resume, save, load, stop, entering
  // an update) and may be held while waiting for them; data_mutex_ guards
  // the fields below and is held only for short reads and writes, never
  // across a wait or an event. Order: operation, then data, then event.
  std::mutex operation_mutex_;
  mutable std::mutex data_mutex_;
  RunState state_ = RunState::paused;
  bool threads_started_ = false;
  bool update_leased_ = false;
  std::string shutdown_reason_;
  bool shutdown_failed_ = false;
  std::optional<std::chrono::microseconds> last_pause_latency_;
  std::stop_source verify_stop_;  // stopped when an update begins: a guest-verify in flight gives up

  // Held only around the sink call, which never blocks; recursive, so that a
  // sink may emit (e.g. request a shutdown) from within an event. Once
  // set_event_sink() returns, the old sink is never called again.
  std::recursive_mutex event_mutex_;
  EventSink event_sink_;
  std::thread prefault_thread_;
  std::atomic<bool> prefault_stop_{false};
};

}  // namespace vmm

// A running virtual machine: KVM VM, guest memory, vCPU threads and devices.
// Built from a MachineConfig; paused, resumed and stopped by the control
// socket, signals, or the guest.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
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
#include "machine/devices/bus.h"
#include "machine/devices/serial.h"
#include "machine/devices/test_guest.h"
#include "machine/vcpu_thread.h"

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
  UniqueFd vm_fd;
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

struct VcpuInfo {
  uint32_t id = 0;
  pid_t thread_id = 0;
  VcpuThread::State state{};
  VcpuExitCounts exits;
};

// Receives events for the control socket: QMP name and data.
using EventSink = std::function<void(const std::string& name, const nlohmann::json& data)>;

class Machine;

// The update state of a Machine (a live update holds it from its first step
// to its last). Move-only; at most one exists per Machine.
class UpdateLease {
 public:
  UpdateLease(UpdateLease&& other) noexcept : machine_(std::exchange(other.machine_, nullptr)) {}
  UpdateLease& operator=(UpdateLease&&) = delete;
  ~UpdateLease();
  [[nodiscard]] Result<std::chrono::microseconds> pause(std::chrono::milliseconds timeout);
  [[nodiscard]] Result<void> resume();
  // The VM now runs elsewhere: the machine stays in the update state until it stops.
  void hand_over();

 private:
  friend class Machine;
  explicit UpdateLease(Machine* machine) : machine_(machine) {}
  Machine* machine_ = nullptr;
};

class Machine final : public VcpuExitHandler {
 public:
  // Enters the update state: EBUSY while another update holds it.
  [[nodiscard]] Result<UpdateLease> begin_update();
  [[nodiscard]] bool update_in_progress() const { return updating_.load(); }

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
  // match it; the vCPUs stay parked (resume() runs them).
  [[nodiscard]] Result<void> load_state(const migration::SavedState& state);

  // The VM's whole state (VM, vCPUs, devices, memory layout); only while
  // paused. Region tokens are left for the caller to fill in.
  [[nodiscard]] Result<migration::SavedState> save_state();
  [[nodiscard]] FdRef vm_fd() const { return vm_.fd(); }
  ~Machine() override;

  // Starts the vCPU threads of a VM from create(), running the guest or
  // parked. (restore() and prebuild() start them parked themselves.)
  [[nodiscard]] Result<void> start(bool running = true);
  // Parks every vCPU; returns how long that took. Bounded by `timeout`.
  [[nodiscard]] Result<std::chrono::microseconds> pause(
      std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));
  [[nodiscard]] Result<void> resume();
  [[nodiscard]] RunState run_state() const;

  // Asks the main loop to shut the VM down (from any thread); idempotent.
  void request_shutdown(const std::string& reason, bool by_guest);
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
  [[nodiscard]] devices::TestGuestLink& guest() { return *guest_link_; }
  [[nodiscard]] const MachineConfig& config() const { return config_; }
  [[nodiscard]] const memory::GuestMemory& memory() const { return memory_; }
  [[nodiscard]] std::optional<std::chrono::microseconds> last_pause_latency() const;

  void set_event_sink(EventSink sink);
  void emit_event(const std::string& name, const nlohmann::json& data);

  // VcpuExitHandler
  void io_in(uint16_t port, std::span<uint8_t> data) override;
  Next io_out(uint16_t port, std::span<const uint8_t> data) override;
  void mmio_read(uint64_t address, std::span<uint8_t> data) override;
  void mmio_write(uint64_t address, std::span<const uint8_t> data) override;
  void guest_system_event(uint32_t vcpu, uint32_t type) override;
  void vcpu_failed(uint32_t vcpu, const std::string& why) override;

 private:
  Machine(MachineConfig config, kvm::System system, kvm::Capabilities caps, kvm::Vm vm,
          memory::GuestMemory memory, UniqueFd shutdown_event);
  // The steps shared by create() and restore().
  struct Host {
    kvm::System system;
    kvm::Capabilities caps;
  };
  [[nodiscard]] static Result<Host> open_host(const MachineConfig& config);
  [[nodiscard]] static Result<void> describe_memory(MachineConfig& config, const memory::MemoryLayout& layout,
                                                    size_t files, memory::SlotKind guest_memfd_slot_kind);
  [[nodiscard]] static Result<devices::ConsoleSink> open_console(const MachineConfig& config);
  [[nodiscard]] static Result<void> prepare_vm(kvm::Vm& vm);
  [[nodiscard]] Result<void> build_devices(devices::ConsoleSink console);
  [[nodiscard]] Result<void> create_vcpus(uint32_t entry);
  [[nodiscard]] Result<void> create_empty_vcpus(const std::vector<std::vector<kvm_cpuid_entry2>>& cpuid);
  // Runs task(i, vcpu) on every parked vCPU's own thread, all at once (the
  // save and load of a live update's blackout); the first error wins.
  [[nodiscard]] Result<void> on_every_vcpu(const std::function<Result<void>(size_t, kvm::Vcpu&)>& task);
  [[nodiscard]] Result<void> restore_vcpus(const std::vector<kvm::VcpuState>& states);
  // The part of create/restore/prebuild after the VM and its memory exist.
  [[nodiscard]] static Result<std::unique_ptr<Machine>> assemble(
      MachineConfig config, Host host, kvm::Vm vm, memory::GuestMemory memory,
      const std::vector<std::vector<kvm_cpuid_entry2>>& cpuid = {});

  MachineConfig config_;
  kvm::System system_;
  kvm::Capabilities caps_;
  kvm::Vm vm_;
  memory::GuestMemory memory_;
  UniqueFd shutdown_event_;

  devices::Bus pio_bus_{"port I/O"};
  devices::Bus mmio_bus_{"MMIO"};
  std::unique_ptr<devices::Serial> serial_;
  std::unique_ptr<devices::ExitPort> exit_port_;
  std::unique_ptr<devices::TestGuestLink> guest_link_;
  std::vector<std::unique_ptr<VcpuThread>> vcpus_;

  mutable std::mutex state_mutex_;  // guards the run state and serializes pause/resume
  RunState state_ = RunState::paused;
  bool threads_started_ = false;
  std::string shutdown_reason_;
  bool shutdown_failed_ = false;
  std::optional<std::chrono::microseconds> last_pause_latency_;

  std::mutex event_mutex_;
  EventSink event_sink_;
  std::atomic<uint64_t> unclaimed_accesses_{0};
  std::vector<uint32_t> msrs_to_save_;
  std::atomic<bool> updating_{false};
  friend class UpdateLease;
  std::thread prefault_thread_;
  std::atomic<bool> prefault_stop_{false};
};

}  // namespace vmm

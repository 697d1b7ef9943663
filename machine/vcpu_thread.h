// One thread per vCPU, driven by messages: run, pause, a task to run while
// paused (save, restore), and exit. Pausing kicks the thread out of KVM_RUN
// with a signal plus kvm_run.immediate_exit, so a vCPU spinning in guest code
// stops within a bounded time; the pause is measured by the caller.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/result.h"
#include "kvm/vcpu.h"

namespace vmm {

// What a vCPU thread reports to the machine around it.
class VcpuExitHandler {
 public:
  enum class Next { resume_guest, park };
  virtual ~VcpuExitHandler() = default;
  virtual void io_in(uint16_t port, std::span<uint8_t> data) = 0;
  virtual Next io_out(uint16_t port, std::span<const uint8_t> data) = 0;
  virtual void mmio_read(uint64_t address, std::span<uint8_t> data) = 0;
  virtual void mmio_write(uint64_t address, std::span<const uint8_t> data) = 0;
  // The guest asked to power off or reset (KVM_EXIT_SYSTEM_EVENT).
  virtual void guest_system_event(uint32_t vcpu, uint32_t type) = 0;
  // The vCPU cannot go on (triple fault, emulation failure, entry failure).
  virtual void vcpu_failed(uint32_t vcpu, const std::string& why) = 0;
};

struct VcpuExitCounts {
  uint64_t io = 0, mmio = 0, hlt = 0, interrupted = 0, other = 0;
};

class VcpuThread {
 public:
  enum class State { created, running, paused, exited };

  VcpuThread(kvm::Vcpu vcpu, VcpuExitHandler& handler);
  ~VcpuThread();  // exits and joins
  VcpuThread(const VcpuThread&) = delete;
  VcpuThread& operator=(const VcpuThread&) = delete;

  // Installs the (empty) kick signal handler; once per process.
  static void install_kick_signal();

  // Starts the thread, running the guest or parked in `paused`.
  [[nodiscard]] Result<void> start(bool running);
  // Asks the vCPU to leave guest mode and park; returns at once.
  void request_pause();
  // Waits until parked (or exited); false on timeout.
  [[nodiscard]] bool wait_paused(std::chrono::steady_clock::time_point deadline);
  void resume();
  void exit();

  // Runs `task` on the vCPU's own thread while it is parked (KVM state
  // ioctls belong to the vCPU's thread). Blocks until done.
  [[nodiscard]] Result<void> run_while_paused(const std::function<Result<void>(kvm::Vcpu&)>& task);
  // The same in two halves, so several vCPUs can work at once: post_task()
  // hands `task` (which must live until wait_task() returns) to the thread.
  [[nodiscard]] Result<void> post_task(const std::function<Result<void>(kvm::Vcpu&)>& task);
  [[nodiscard]] Result<void> wait_task();

  [[nodiscard]] uint32_t id() const { return id_; }
  // The CPUID last set on this vCPU (only ever set while it is parked).
  [[nodiscard]] const std::vector<kvm_cpuid_entry2>& cpuid_set() const { return vcpu_.cpuid_set(); }
  [[nodiscard]] pid_t thread_id() const { return thread_id_.load(); }
  [[nodiscard]] State state() const;
  [[nodiscard]] VcpuExitCounts exit_counts() const;

 private:
  // The registers and events after a fatal exit, as text for the report.
  [[nodiscard]] std::string where_it_stopped() const;
  enum class Command { run, pause, exit };
  void main();
  // Handles one exit; false when the vCPU must park.
  bool handle_exit();

  kvm::Vcpu vcpu_;
  const uint32_t id_;
  VcpuExitHandler& handler_;
  std::thread thread_;
  std::atomic<pid_t> thread_id_{0};

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  Command command_ = Command::pause;
  State state_ = State::created;
  const std::function<Result<void>(kvm::Vcpu&)>* task_ = nullptr;
  Result<void> task_result_;
  bool task_done_ = false;

  struct AtomicCounts {
    std::atomic<uint64_t> io{0}, mmio{0}, hlt{0}, interrupted{0}, other{0};
  } counts_;
};

}  // namespace vmm

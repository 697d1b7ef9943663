// The vCPU set of a Machine: one VcpuThread per vCPU, paused, resumed and
// given tasks together. Holds no lock of its own beyond each thread's: the
// Machine serializes the operations (its operation lock).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "base/result.h"
#include "kvm/vcpu.h"
#include "machine/vcpu_thread.h"

namespace vmm {

struct VcpuInfo {
  uint32_t id = 0;
  pid_t thread_id = 0;
  VcpuThread::State state{};
  VcpuExitCounts exits;
};

class VcpuSet {
 public:
  VcpuSet() = default;
  VcpuSet(const VcpuSet&) = delete;
  VcpuSet& operator=(const VcpuSet&) = delete;

  // Adds a vCPU (not started) whose exits go to `handler`.
  void add(kvm::Vcpu vcpu, VcpuExitHandler& handler);
  // Starts every thread, running the guest or parked.
  [[nodiscard]] Result<void> start(bool running);
  // Parks every vCPU against one deadline and returns how long that took. On
  // timeout every vCPU runs again and the error is ETIMEDOUT.
  [[nodiscard]] Result<std::chrono::microseconds> pause(std::chrono::milliseconds timeout);
  void resume();
  // Stops every thread for good (joins them).
  void exit();
  // Runs task(i, vcpu) on every parked vCPU's own thread, all at once; the
  // first error wins.
  [[nodiscard]] Result<void> on_every_vcpu(const std::function<Result<void>(size_t, kvm::Vcpu&)>& task);

  [[nodiscard]] size_t size() const { return threads_.size(); }
  [[nodiscard]] std::vector<std::vector<kvm_cpuid_entry2>> cpuid() const;
  [[nodiscard]] std::vector<VcpuInfo> info() const;

 private:
  std::vector<std::unique_ptr<VcpuThread>> threads_;
};

}  // namespace vmm

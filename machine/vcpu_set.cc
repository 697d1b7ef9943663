#include "machine/vcpu_set.h"

#include <fmt/format.h>

namespace vmm {

using namespace std::chrono;

void VcpuSet::add(kvm::Vcpu vcpu, VcpuExitHandler& handler) {
  threads_.push_back(std::make_unique<VcpuThread>(std::move(vcpu), handler));
}

Result<void> VcpuSet::start(bool running) {
  for (auto& thread : threads_) VMM_TRY(thread->start(running));
  return {};
}

Result<microseconds> VcpuSet::pause(milliseconds timeout) {
  const auto begin = steady_clock::now();
  for (auto& thread : threads_) thread->request_pause();
  const auto deadline = begin + timeout;
  for (auto& thread : threads_) {
    if (!thread->wait_paused(deadline)) {
      // Leave no vCPU half-stopped: let the others run again.
      resume();
      return fail(fmt::format("vCPU {} did not pause within {} ms", thread->id(), timeout.count()), ETIMEDOUT);
    }
  }
  return duration_cast<microseconds>(steady_clock::now() - begin);
}

void VcpuSet::resume() {
  for (auto& thread : threads_) thread->resume();
}

void VcpuSet::exit() {
  for (auto& thread : threads_) thread->exit();
}

Result<void> VcpuSet::on_every_vcpu(const std::function<Result<void>(size_t, kvm::Vcpu&)>& task) {
  std::vector<std::function<Result<void>(kvm::Vcpu&)>> tasks;
  tasks.reserve(threads_.size());
  for (size_t i = 0; i < threads_.size(); ++i)
    tasks.emplace_back([&task, i](kvm::Vcpu& vcpu) { return task(i, vcpu); });
  size_t posted = 0;
  Result<void> outcome;
  for (; posted < threads_.size(); ++posted) {
    if (auto sent = threads_[posted]->post_task(tasks[posted]); !sent) {
      outcome = std::unexpected(sent.error());
      break;
    }
  }
  for (size_t i = 0; i < posted; ++i) {
    auto done = threads_[i]->wait_task();
    if (!done && outcome) outcome = std::unexpected(done.error());
  }
  return outcome;
}

std::vector<std::vector<kvm_cpuid_entry2>> VcpuSet::cpuid() const {
  std::vector<std::vector<kvm_cpuid_entry2>> out;
  for (const auto& thread : threads_) out.push_back(thread->cpuid_set());
  return out;
}

std::vector<VcpuInfo> VcpuSet::info() const {
  std::vector<VcpuInfo> infos;
  for (const auto& thread : threads_)
    infos.push_back({thread->id(), thread->thread_id(), thread->state(), thread->exit_counts()});
  return infos;
}

}  // namespace vmm

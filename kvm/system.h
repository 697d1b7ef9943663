// The KVM system device (/dev/kvm): capability probing and VM creation.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kvm/msrs.h"
#include "base/result.h"
#include "base/unique_fd.h"
#include "kvm/vm.h"

namespace vmm::kvm {

// What this host's KVM offers, probed once at start-up.
struct Capabilities {
  int api_version = 0;
  int vcpu_mmap_size = 0;
  int max_vcpus = 0;
  int nr_vcpus = 0;  // recommended maximum (KVM_CAP_NR_VCPUS)
  bool user_memory2 = false;
  bool guest_memfd = false;
  uint64_t guest_memfd_flags = 0;  // KVM_CAP_GUEST_MEMFD_FLAGS mask
  bool immediate_exit = false;
  bool xsave = false;
  bool xcrs = false;
  bool vcpu_events = false;
  bool debugregs = false;
  bool adjust_clock = false;
  bool kvmclock_ctrl = false;
  bool tsc_khz = false;
  bool irqchip = false;
  bool pit2 = false;
  bool irqfd = false;
  bool ioeventfd = false;
  bool pre_fault_memory = false;  // 0 without TDP (shadow paging)

  // guest_memfd created with MMAP | INIT_SHARED and bound via
  // KVM_SET_USER_MEMORY_REGION2 works on this host.
  [[nodiscard]] bool guest_memfd_mmap() const;
};

class System {
 public:
  // Opens /dev/kvm (or `path`); the error says what to do when it is absent
  // or not accessible.
  [[nodiscard]] static Result<System> open(const std::string& path = "/dev/kvm");

  // Probes every capability the VMM uses. Fails with a message naming the
  // missing capability when one the VMM cannot run without is absent.
  [[nodiscard]] Result<Capabilities> probe() const;

  // KVM_CHECK_EXTENSION on the system fd.
  [[nodiscard]] Result<int> check_extension(long cap) const;

  [[nodiscard]] Result<Vm> create_vm() const;

  // KVM_GET_SUPPORTED_CPUID.
  [[nodiscard]] Result<std::vector<kvm_cpuid_entry2>> supported_cpuid() const;
  // KVM_GET_MSR_INDEX_LIST: MSRs that KVM can save and restore.
  [[nodiscard]] Result<std::vector<uint32_t>> msr_index_list() const;
  // The MSRs a vCPU save must carry: msrs_worth_saving() (kvm/msrs.h) that
  // this host's KVM lists, in that list's order.
  [[nodiscard]] Result<std::vector<uint32_t>> msrs_to_save() const;

  [[nodiscard]] FdRef fd() const { return fd_.ref(); }
  [[nodiscard]] int vcpu_mmap_size() const { return vcpu_mmap_size_; }

 private:
  System(UniqueFd fd, int vcpu_mmap_size) : fd_(std::move(fd)), vcpu_mmap_size_(vcpu_mmap_size) {}
  UniqueFd fd_;
  int vcpu_mmap_size_ = 0;
};

}  // namespace vmm::kvm

// A KVM virtual machine: the single owner of every VM-level ioctl.
#pragma once

#include <linux/kvm.h>

#include <cstdint>

#include "kvm/guest_memfd.h"
#include "base/result.h"
#include "kvm/state.h"
#include "base/unique_fd.h"
#include "kvm/vcpu.h"

namespace vmm::kvm {

// One memslot as given to KVM_SET_USER_MEMORY_REGION2.
struct MemorySlot {
  uint32_t slot = 0;
  uint64_t guest_phys_addr = 0;
  uint64_t size = 0;
  void* host_address = nullptr;
  FdRef guest_memfd;                // valid: a KVM_MEM_GUEST_MEMFD slot
  uint64_t guest_memfd_offset = 0;
};

class Vm {
 public:
  // Wraps an existing VM fd (a fresh KVM_CREATE_VM, or one retrieved from LUO).
  Vm(UniqueFd fd, int vcpu_mmap_size) : fd_(std::move(fd)), vcpu_mmap_size_(vcpu_mmap_size) {}

  // x86 set-up that must precede vCPU creation.
  [[nodiscard]] Result<void> set_tss_addr(uint64_t gpa);
  [[nodiscard]] Result<void> set_identity_map_addr(uint64_t gpa);
  [[nodiscard]] Result<void> create_irqchip();
  [[nodiscard]] Result<void> create_pit2();

  // KVM_CREATE_GUEST_MEMFD. The error explains when the host lacks
  // guest_memfd or the requested flags, and suggests --memory-backing memfd.
  [[nodiscard]] Result<GuestMemfd> create_guest_memfd(uint64_t size, uint64_t flags);
  // KVM_SET_USER_MEMORY_REGION2 (with KVM_MEM_GUEST_MEMFD when slot.guest_memfd is valid).
  [[nodiscard]] Result<void> set_memory_slot(const MemorySlot& slot);
  // Deletes memslot `slot` (KVM_SET_USER_MEMORY_REGION2 with size 0).
  [[nodiscard]] Result<void> clear_memory_slot(uint32_t slot);

  // KVM_CHECK_EXTENSION on the VM fd (some answers, e.g. guest_memfd flags,
  // depend on the VM type).
  [[nodiscard]] Result<int> check_extension(long cap) const;

  // Whether this process may use the VM behind `vm_fd`: KVM answers every VM
  // ioctl with EIO in any process but the one whose memory the VM was created
  // in (KVM_CREATE_VM, or the process that retrieved it from LUO).
  [[nodiscard]] static Result<bool> usable_by_this_process(FdRef vm_fd);

  [[nodiscard]] Result<Vcpu> create_vcpu(uint32_t id);

  // KVM_IRQ_LINE on the in-kernel irqchip (GSI numbering).
  [[nodiscard]] Result<void> set_irq_line(uint32_t gsi, bool level);

  // Irqchip (PIC master/slave, IOAPIC), PIT and kvmclock. restore() sets the
  // kvmclock to exactly state.clock.clock (its flags are ignored): time spent
  // between save and restore is the caller's to add, together with the TSC.
  [[nodiscard]] Result<VmState> save() const;
  [[nodiscard]] Result<void> restore(const VmState& state);

  [[nodiscard]] FdRef fd() const { return fd_.ref(); }
  [[nodiscard]] int vcpu_mmap_size() const { return vcpu_mmap_size_; }
  // Hands the VM fd to a new owner (a LUO session).
  [[nodiscard]] UniqueFd take_fd() && { return std::move(fd_); }

 private:
  UniqueFd fd_;
  int vcpu_mmap_size_ = 0;
};

}  // namespace vmm::kvm

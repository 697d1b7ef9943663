// Saved state of a VM and its vCPUs: plain data, separate from the live
// objects (Vm, Vcpu) that save() into and restore() from it. Guest RAM is
// never part of this; memory is described by memory::MemoryLayout.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <vector>

#include "kvm/uapi.h"

namespace vmm::kvm {

struct MsrEntry {
  uint32_t index = 0;
  uint64_t data = 0;
  friend bool operator==(const MsrEntry&, const MsrEntry&) = default;
};

struct VcpuState {
  uint32_t id = 0;
  kvm_regs regs{};
  kvm_sregs sregs{};
  kvm_fpu fpu{};
  uapi::Xsave xsave{};  // legacy 4 KiB area from KVM_GET_XSAVE (C++-safe kvm_xsave)
  kvm_xcrs xcrs{};
  std::vector<MsrEntry> msrs;  // TSC, kvmclock, SYSENTER, STAR/LSTAR, EFER, PAT, ...
  kvm_lapic_state lapic{};
  kvm_mp_state mp_state{};
  kvm_vcpu_events events{};
  kvm_debugregs debugregs{};
  std::vector<kvm_cpuid_entry2> cpuid;  // what KVM_SET_CPUID2 was given
  uint64_t tsc_khz = 0;
};

struct VmState {
  kvm_pic_state pic_master{};
  kvm_pic_state pic_slave{};
  kvm_ioapic_state ioapic{};
  kvm_pit_state2 pit{};
  kvm_clock_data clock{};
};

}  // namespace vmm::kvm

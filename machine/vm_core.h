// The VM core of a Machine: /dev/kvm, the KVM VM (with its TSS, identity
// map, irqchip and PIT) and the guest memory registered with it.
#pragma once

#include <cstdint>
#include <vector>

#include "kvm/system.h"
#include "kvm/vm.h"
#include "memory/guest_memory.h"

namespace vmm {

struct VmCore {
  kvm::System system;
  kvm::Capabilities caps;
  kvm::Vm vm;
  memory::GuestMemory memory;
  std::vector<uint32_t> msrs_to_save;  // the MSRs every vCPU's saved state carries
};

}  // namespace vmm

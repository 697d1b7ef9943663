// The embedded test guest: a static x86-64 ELF linked at 1 MiB that boots
// through the Xen PVH entry (XEN_ELFNOTE_PHYS32_ENTRY; e_entry is the same
// address). Link the `vmm_test_guest` library to get it.
//
// Booting it: load every PT_LOAD segment at its p_paddr (zero-filling
// p_memsz beyond p_filesz), then start every vCPU at the PVH entry in 32-bit
// protected mode (flat 4 GiB CS/DS/SS, CR0.PE=1, paging off, IF=0) with
// EBX = guest-physical address of struct hvm_start_info (guest/pvh.h).
// Each vCPU's CPUID leaf 1 EBX[31:24] must be its index (0 = BSP).
// The protocol with the VMM is guest/protocol.h; options and console output
// are described in guest/README.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

extern "C" const unsigned char vmm_test_guest_elf[];
extern "C" const unsigned long vmm_test_guest_elf_size;

namespace vmm::guest {

// The ELF file, as bytes.
inline std::span<const std::uint8_t> test_guest_image() {
  return {reinterpret_cast<const std::uint8_t*>(vmm_test_guest_elf),
          static_cast<std::size_t>(vmm_test_guest_elf_size)};
}

}  // namespace vmm::guest

// The PVH boot protocol (Xen's, also used by QEMU microvm and Cloud
// Hypervisor): an ELF with a XEN_ELFNOTE_PHYS32_ENTRY note is entered in
// 32-bit protected mode with paging off and %ebx pointing at hvm_start_info.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "memory/guest_memory.h"

namespace vmm::pvh {

inline constexpr uint32_t kStartInfoMagic = 0x336ec578;
inline constexpr uint32_t kXenElfnotePhys32Entry = 18;

struct HvmStartInfo {
  uint32_t magic;
  uint32_t version;
  uint32_t flags;
  uint32_t nr_modules;
  uint64_t modlist_paddr;
  uint64_t cmdline_paddr;
  uint64_t rsdp_paddr;
  uint64_t memmap_paddr;  // version 1
  uint32_t memmap_entries;
  uint32_t reserved;
};
static_assert(sizeof(HvmStartInfo) == 56);

struct HvmMemmapEntry {
  uint64_t addr;
  uint64_t size;
  uint32_t type;  // E820 types: 1 RAM, 2 reserved
  uint32_t reserved;
};
static_assert(sizeof(HvmMemmapEntry) == 24);

inline constexpr uint32_t kE820Ram = 1;
inline constexpr uint32_t kE820Reserved = 2;

// Where the VMM puts the boot data, below the 1 MiB where kernels load.
inline constexpr uint64_t kStartInfoGpa = 0x6000;
inline constexpr uint64_t kMemmapGpa = 0x6040;
inline constexpr uint64_t kMaxMemmapEntries = (0x7000 - kMemmapGpa) / sizeof(HvmMemmapEntry);
inline constexpr uint64_t kCmdlineGpa = 0x7000;
inline constexpr uint64_t kCmdlineMax = 0x1000;  // including the NUL
inline constexpr uint64_t kLowMemoryEnd = 0x9fc00;  // below: RAM; up to 1 MiB: legacy, reserved
inline constexpr uint64_t kKernelLoadFloor = 0x100000;

struct Segment {
  uint64_t gpa = 0;
  uint64_t file_offset = 0;
  uint64_t file_size = 0;
  uint64_t memory_size = 0;
};

struct Image {
  uint32_t entry = 0;  // 32-bit physical entry point from the PVH note
  std::vector<Segment> segments;
};

// Reads a kernel file; the error names the path and the reason.
[[nodiscard]] Result<std::vector<uint8_t>> read_file(const std::string& path);

// Validates an ELF64 x86-64 image with a PVH entry note. `origin` names the
// image in errors ("kernel /path/vmlinux", "the embedded test guest").
[[nodiscard]] Result<Image> parse(std::span<const uint8_t> elf, std::string_view origin);

// The memory map the guest sees, from the memory layout.
[[nodiscard]] std::vector<HvmMemmapEntry> memory_map(const memory::MemoryLayout& layout);

// Copies the segments into guest RAM and writes hvm_start_info, the memory
// map and the command line. Returns the entry point.
[[nodiscard]] Result<uint32_t> load(const memory::GuestMemory& memory, std::span<const uint8_t> elf,
                                    const Image& image, std::string_view cmdline);

}  // namespace vmm::pvh

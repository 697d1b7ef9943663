// The embedded test guest image: a static ELF64 x86-64 executable loaded at
// 1 MiB with a Xen PVH entry note pointing into its code.
#include <elf.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "guest/embedded.h"
#include "guest/protocol.h"
#include "guest/pvh.h"

namespace vmm::guest {
namespace {

constexpr uint64_t kImageBase = 0x100000;

template <class T>
T read_at(std::span<const uint8_t> bytes, uint64_t offset) {
  T value;
  EXPECT_LE(offset + sizeof(T), bytes.size());
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

Elf64_Ehdr header() { return read_at<Elf64_Ehdr>(test_guest_image(), 0); }

std::vector<Elf64_Phdr> program_headers() {
  const auto image = test_guest_image();
  const Elf64_Ehdr ehdr = header();
  std::vector<Elf64_Phdr> headers;
  for (unsigned i = 0; i < ehdr.e_phnum; i++)
    headers.push_back(read_at<Elf64_Phdr>(image, ehdr.e_phoff + uint64_t{i} * ehdr.e_phentsize));
  return headers;
}

// The XEN_ELFNOTE_PHYS32_ENTRY address, from the PT_NOTE segments.
std::optional<uint32_t> pvh_entry() {
  const auto image = test_guest_image();
  for (const Elf64_Phdr& phdr : program_headers()) {
    if (phdr.p_type != PT_NOTE) continue;
    uint64_t offset = phdr.p_offset;
    const uint64_t end = phdr.p_offset + phdr.p_filesz;
    while (offset + sizeof(Elf64_Nhdr) <= end) {
      const auto note = read_at<Elf64_Nhdr>(image, offset);
      const uint64_t name = offset + sizeof(Elf64_Nhdr);
      const uint64_t desc = name + ((note.n_namesz + 3) & ~3u);
      const std::string_view note_name(reinterpret_cast<const char*>(image.data() + name),
                                       note.n_namesz);
      if (note_name == std::string_view("Xen\0", 4) && note.n_type == XEN_ELFNOTE_PHYS32_ENTRY &&
          note.n_descsz == 4)
        return read_at<uint32_t>(image, desc);
      offset = desc + ((note.n_descsz + 3) & ~3u);
    }
  }
  return std::nullopt;
}

TEST(GuestImage, IsAStaticElf64X8664Executable) {
  const auto image = test_guest_image();
  ASSERT_GE(image.size(), sizeof(Elf64_Ehdr));
  EXPECT_EQ(std::memcmp(image.data(), ELFMAG, SELFMAG), 0);
  EXPECT_EQ(image[EI_CLASS], ELFCLASS64);
  EXPECT_EQ(image[EI_DATA], ELFDATA2LSB);
  const Elf64_Ehdr ehdr = header();
  EXPECT_EQ(ehdr.e_machine, EM_X86_64);
  EXPECT_EQ(ehdr.e_type, ET_EXEC);
  for (const Elf64_Phdr& phdr : program_headers()) {
    EXPECT_NE(phdr.p_type, PT_INTERP);
    EXPECT_NE(phdr.p_type, PT_DYNAMIC);
  }
}

TEST(GuestImage, LoadsAtOneMebibyteWithinTheFile) {
  const auto image = test_guest_image();
  bool loads_at_base = false;
  for (const Elf64_Phdr& phdr : program_headers()) {
    if (phdr.p_type != PT_LOAD) continue;
    loads_at_base |= phdr.p_paddr == kImageBase;
    EXPECT_GE(phdr.p_paddr, kImageBase);
    EXPECT_LE(phdr.p_filesz, phdr.p_memsz);
    EXPECT_LE(phdr.p_offset + phdr.p_filesz, image.size());
    // Well below the shared region, whatever the RAM size.
    EXPECT_LT(phdr.p_paddr + phdr.p_memsz, uint64_t{64} << 20);
  }
  EXPECT_TRUE(loads_at_base);
}

TEST(GuestImage, PvhEntryIsInsideLoadedCode) {
  const auto entry = pvh_entry();
  ASSERT_TRUE(entry.has_value()) << "no XEN_ELFNOTE_PHYS32_ENTRY note";
  EXPECT_EQ(*entry, header().e_entry);
  bool inside = false;
  for (const Elf64_Phdr& phdr : program_headers()) {
    if (phdr.p_type == PT_LOAD && (phdr.p_flags & PF_X) && *entry >= phdr.p_paddr &&
        *entry < phdr.p_paddr + phdr.p_filesz)
      inside = true;
  }
  EXPECT_TRUE(inside) << "entry 0x" << std::hex << *entry << " is not in a loaded executable segment";
}

}  // namespace
}  // namespace vmm::guest

#include <elf.h>
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "guest/embedded.h"
#include "machine/pvh.h"

namespace vmm::pvh {
namespace {

std::vector<uint8_t> embedded() {
  auto image = guest::test_guest_image();
  return {image.begin(), image.end()};
}

TEST(Pvh, EmbeddedTestGuestIsAPvhImage) {
  auto image = parse(guest::test_guest_image(), "the embedded test guest");
  ASSERT_TRUE(image.has_value()) << image.error().describe();
  EXPECT_GE(image->entry, kKernelLoadFloor);
  ASSERT_FALSE(image->segments.empty());
  EXPECT_GE(image->segments.front().gpa, kKernelLoadFloor);
}

TEST(Pvh, RejectsWhatIsNotAPvhElf) {
  std::vector<uint8_t> text{'h', 'e', 'l', 'l', 'o'};
  EXPECT_NE(parse(text, "x").error().message.find("not an ELF"), std::string::npos);

  auto elf32 = embedded();
  elf32[EI_CLASS] = ELFCLASS32;
  EXPECT_NE(parse(elf32, "x").error().message.find("64-bit"), std::string::npos);

  auto arm = embedded();
  Elf64_Ehdr header;
  std::memcpy(&header, arm.data(), sizeof header);
  header.e_machine = EM_AARCH64;
  std::memcpy(arm.data(), &header, sizeof header);
  EXPECT_NE(parse(arm, "x").error().message.find("x86-64"), std::string::npos);

  // Remove the Xen note: the image is no longer PVH.
  auto no_note = embedded();
  bool found = false;
  for (size_t i = 0; i + 4 <= no_note.size(); ++i) {
    if (std::memcmp(no_note.data() + i, "Xen\0", 4) == 0) {
      no_note[i] = 'Q';
      found = true;
    }
  }
  ASSERT_TRUE(found);
  EXPECT_NE(parse(no_note, "x").error().message.find("not a PVH kernel"), std::string::npos);
}

TEST(Pvh, RejectsTruncatedImagesAtEveryLength) {
  const auto full = embedded();
  for (size_t length = 0; length < full.size(); length += std::max<size_t>(1, full.size() / 200)) {
    std::span<const uint8_t> prefix(full.data(), length);
    auto parsed = parse(prefix, "x");
    // A prefix is either refused or, if it still holds every header and
    // segment it names, accepted; it never reads out of bounds (ASan build).
    if (parsed) {
      for (const auto& s : parsed->segments) EXPECT_LE(s.file_offset + s.file_size, length);
    }
  }
  EXPECT_FALSE(parse(std::span(full.data(), 64), "x").has_value());
}

TEST(Pvh, MemoryMapKeepsTheLegacyHoleAndMarksSharedReserved) {
  auto layout = memory::MemoryLayout::plan(4ull << 30, 16ull << 20, memory::Backing::guest_memfd);
  ASSERT_TRUE(layout.has_value());
  auto map = memory_map(*layout);
  ASSERT_GE(map.size(), 5u);
  EXPECT_EQ(map[0].addr, 0u);
  EXPECT_EQ(map[0].type, kE820Ram);
  EXPECT_EQ(map[0].size, kLowMemoryEnd);
  EXPECT_EQ(map[1].type, kE820Reserved);
  EXPECT_EQ(map[2].addr, kKernelLoadFloor);
  uint64_t ram = 0;
  bool shared_reserved = false;
  for (const auto& entry : map) {
    if (entry.type == kE820Ram) ram += entry.size;
    if (entry.addr == memory::kSharedRegionGpa) shared_reserved = entry.type == kE820Reserved;
  }
  EXPECT_EQ(ram, (4ull << 30) - (kKernelLoadFloor - kLowMemoryEnd));
  EXPECT_TRUE(shared_reserved);
  for (size_t i = 1; i < map.size(); ++i) EXPECT_GE(map[i].addr, map[i - 1].addr + map[i - 1].size);
}

}  // namespace
}  // namespace vmm::pvh

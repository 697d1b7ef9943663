#include "memory/layout.h"

#include <gtest/gtest.h>

#include "memory/guest_memory.h"

namespace vmm::memory {
namespace {

constexpr uint64_t MiB = 1ULL << 20;
constexpr uint64_t GiB = 1ULL << 30;

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

TEST(MemoryLayout, SmallRamIsOneRegionPlusShared) {
  auto layout = MemoryLayout::plan(64 * MiB, kDefaultSharedSize, Backing::guest_memfd);
  ASSERT_TRUE(layout) << layout.error().describe();
  ASSERT_EQ(layout->regions.size(), 2u);
  EXPECT_EQ(layout->regions[0], (RegionSpec{.name = "ram0", .role = RegionRole::ram,
                                            .backing = Backing::guest_memfd, .gpa = 0,
                                            .size = 64 * MiB, .slot = 0}));
  EXPECT_EQ(layout->regions[1], (RegionSpec{.name = "shared", .role = RegionRole::shared,
                                            .backing = Backing::memfd, .gpa = kSharedRegionGpa,
                                            .size = kDefaultSharedSize, .slot = 1}));
  EXPECT_EQ(layout->ram_size(), 64 * MiB);
  EXPECT_EQ(layout->find("ram1"), nullptr);
  ASSERT_NE(layout->shared(), nullptr);
  EXPECT_EQ(layout->shared()->name, "shared");
  EXPECT_EQ(layout->find("ram0"), &layout->regions[0]);
}

TEST(MemoryLayout, ExactlyThreeGibFitsBelowTheHole) {
  auto layout = MemoryLayout::plan(3 * GiB, kDefaultSharedSize, Backing::guest_memfd);
  ASSERT_TRUE(layout) << layout.error().describe();
  ASSERT_EQ(layout->regions.size(), 2u);
  EXPECT_EQ(layout->regions[0].size, kLowRamEnd);
  EXPECT_EQ(layout->find("ram1"), nullptr);
}

TEST(MemoryLayout, FourGibSplitsAroundTheHole) {
  auto layout = MemoryLayout::plan(4 * GiB, kDefaultSharedSize, Backing::guest_memfd);
  ASSERT_TRUE(layout) << layout.error().describe();
  ASSERT_EQ(layout->regions.size(), 3u);
  const RegionSpec* ram0 = layout->find("ram0");
  const RegionSpec* ram1 = layout->find("ram1");
  ASSERT_TRUE(ram0 && ram1);
  EXPECT_EQ(ram0->gpa, 0u);
  EXPECT_EQ(ram0->size, 3 * GiB);
  EXPECT_EQ(ram1->gpa, kHighRamStart);
  EXPECT_EQ(ram1->size, 1 * GiB);
  EXPECT_EQ(ram1->slot, 1u);
  EXPECT_EQ(layout->shared()->slot, 2u);
  EXPECT_EQ(layout->ram_size(), 4 * GiB);
}

TEST(MemoryLayout, RegionsNeverOverlapAndSharedSitsInTheHole) {
  for (uint64_t ram : std::initializer_list<uint64_t>{4096, 512 * MiB, 3 * GiB - 4096, 3 * GiB + 4096, 16 * GiB}) {
    auto layout = MemoryLayout::plan(ram, kSharedRegionMaxSize, Backing::memfd);
    ASSERT_TRUE(layout) << layout.error().describe();
    for (size_t i = 0; i < layout->regions.size(); ++i) {
      for (size_t j = i + 1; j < layout->regions.size(); ++j) {
        const RegionSpec& a = layout->regions[i];
        const RegionSpec& b = layout->regions[j];
        EXPECT_TRUE(a.gpa + a.size <= b.gpa || b.gpa + b.size <= a.gpa) << a.name << "/" << b.name;
        EXPECT_NE(a.slot, b.slot);
      }
    }
    const RegionSpec* shared = layout->shared();
    EXPECT_GE(shared->gpa, kLowRamEnd);
    EXPECT_LE(shared->gpa + shared->size, 0xFEC0'0000u) << "must stay below the IOAPIC";
    EXPECT_EQ(layout->ram_size(), ram);
  }
}

TEST(MemoryLayout, RamBackingAppliesToRamOnly) {
  auto layout = MemoryLayout::plan(4 * GiB, kDefaultSharedSize, Backing::memfd);
  ASSERT_TRUE(layout);
  EXPECT_EQ(layout->find("ram0")->backing, Backing::memfd);
  EXPECT_EQ(layout->find("ram1")->backing, Backing::memfd);
  auto gmem = MemoryLayout::plan(4 * GiB, kDefaultSharedSize, Backing::guest_memfd);
  ASSERT_TRUE(gmem);
  EXPECT_EQ(gmem->shared()->backing, Backing::memfd);
  EXPECT_NE(*layout, *gmem);
}

TEST(MemoryLayout, ZeroRamIsRefused) {
  auto layout = MemoryLayout::plan(0, kDefaultSharedSize, Backing::guest_memfd);
  ASSERT_FALSE(layout);
  EXPECT_EQ(layout.error().code, EINVAL);
  EXPECT_TRUE(contains(layout.error().message, "RAM size is 0")) << layout.error().message;
}

TEST(MemoryLayout, UnalignedRamNamesTheValueAndThePageSize) {
  auto layout = MemoryLayout::plan(64 * MiB + 100, kDefaultSharedSize, Backing::guest_memfd);
  ASSERT_FALSE(layout);
  EXPECT_TRUE(contains(layout.error().message, std::to_string(64 * MiB + 100)))
      << layout.error().message;
  EXPECT_TRUE(contains(layout.error().message, "4096")) << layout.error().message;
}

TEST(MemoryLayout, SharedSizeOutOfRangeIsRefused) {
  for (uint64_t shared : std::initializer_list<uint64_t>{0, 4096 + 1, kSharedRegionMaxSize + 4096}) {
    auto layout = MemoryLayout::plan(64 * MiB, shared, Backing::guest_memfd);
    ASSERT_FALSE(layout) << shared;
    EXPECT_TRUE(contains(layout.error().message, "shared region size")) << layout.error().message;
    EXPECT_TRUE(contains(layout.error().message, std::to_string(shared))) << layout.error().message;
  }
  EXPECT_TRUE(MemoryLayout::plan(64 * MiB, kSharedRegionMaxSize, Backing::guest_memfd));
  EXPECT_TRUE(MemoryLayout::plan(64 * MiB, 4096, Backing::guest_memfd));
}

TEST(MemoryLayout, RamBeyondTheAddressSpaceIsRefused) {
  auto layout = MemoryLayout::plan(kMaxRamSize + 4096, kDefaultSharedSize, Backing::guest_memfd);
  ASSERT_FALSE(layout);
  EXPECT_TRUE(MemoryLayout::plan(kMaxRamSize, kDefaultSharedSize, Backing::guest_memfd));
}

TEST(Names, BackingRoundTrips) {
  for (Backing backing : {Backing::guest_memfd, Backing::memfd}) {
    EXPECT_EQ(backing_from_string(to_string(backing)), backing);
  }
  EXPECT_EQ(backing_from_string("hugetlbfs"), std::nullopt);
  EXPECT_EQ(to_string(SlotKind::guest_memfd), "guest_memfd");
  EXPECT_EQ(to_string(SlotKind::userspace), "userspace");
  EXPECT_EQ(to_string(RegionRole::shared), "shared");
}

TEST(Names, FormatSize) {
  EXPECT_EQ(format_size(1ULL << 40), "1 TiB");
  EXPECT_EQ(format_size(3 * GiB), "3 GiB");
  EXPECT_EQ(format_size(3 * GiB / 2), "1.50 GiB");
  EXPECT_EQ(format_size(16 * MiB), "16 MiB");
  EXPECT_EQ(format_size(4096), "4 KiB");
  EXPECT_EQ(format_size(100), "100 bytes");
}

}  // namespace
}  // namespace vmm::memory

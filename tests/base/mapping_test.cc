#include "base/mapping.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <type_traits>

namespace vmm::memory {
namespace {

constexpr size_t kSize = 64 * 1024;

UniqueFd make_memfd() {
  UniqueFd fd(::memfd_create("mapping-test", MFD_CLOEXEC));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::ftruncate(fd.get(), kSize), 0);
  return fd;
}

// msync fails with ENOMEM on addresses that are not mapped.
bool is_mapped(void* addr) { return ::msync(addr, 4096, MS_ASYNC) == 0; }

TEST(Mapping, IsMoveOnly) {
  static_assert(!std::is_copy_constructible_v<Mapping>);
  static_assert(!std::is_copy_assignable_v<Mapping>);
  static_assert(std::is_nothrow_move_constructible_v<Mapping>);
  static_assert(std::is_nothrow_move_assignable_v<Mapping>);
}

TEST(Mapping, SharedMappingsOfOneFileSeeTheSameBytes) {
  UniqueFd fd = make_memfd();
  auto first = Mapping::map_shared(fd.ref(), kSize);
  auto second = Mapping::map_shared(fd.ref(), kSize);
  ASSERT_TRUE(first && second);
  EXPECT_EQ(first->size(), kSize);
  EXPECT_EQ(first->bytes().size(), kSize);
  std::memcpy(first->data() + 100, "hello", 6);
  EXPECT_STREQ(reinterpret_cast<const char*>(second->data() + 100), "hello");
  // An offset mapping sees the file from that offset.
  auto tail = Mapping::map_shared(fd.ref(), 4096, 4096);
  ASSERT_TRUE(tail);
  first->data()[4096] = 0x5a;
  EXPECT_EQ(tail->data()[0], 0x5a);
}

TEST(Mapping, MoveTransfersAndDestructionUnmaps) {
  UniqueFd fd = make_memfd();
  auto mapped = Mapping::map_shared(fd.ref(), kSize);
  ASSERT_TRUE(mapped);
  uint8_t* addr = mapped->data();
  {
    Mapping owner(std::move(*mapped));
    EXPECT_FALSE(mapped->valid());  // NOLINT(bugprone-use-after-move)
    EXPECT_EQ(mapped->size(), 0u);
    EXPECT_EQ(owner.data(), addr);
    EXPECT_TRUE(is_mapped(addr));
  }
  EXPECT_FALSE(is_mapped(addr));
}

TEST(Mapping, MoveAssignUnmapsThePreviousRange) {
  UniqueFd fd = make_memfd();
  auto target = Mapping::map_shared(fd.ref(), kSize);
  auto source = Mapping::map_shared(fd.ref(), kSize);
  ASSERT_TRUE(target && source);
  uint8_t* old_addr = target->data();
  uint8_t* new_addr = source->data();
  *target = std::move(*source);
  EXPECT_FALSE(is_mapped(old_addr));
  EXPECT_EQ(target->data(), new_addr);
  EXPECT_TRUE(is_mapped(new_addr));
}

TEST(Mapping, ErrorsAreReported) {
  auto empty = Mapping::map_shared(FdRef(-1), 0);
  ASSERT_FALSE(empty);
  EXPECT_EQ(empty.error().code, EINVAL);
  auto bad_fd = Mapping::map_shared(FdRef(-1), kSize);
  ASSERT_FALSE(bad_fd);
  EXPECT_EQ(bad_fd.error().code, EBADF);
  EXPECT_NE(bad_fd.error().message.find("mmap"), std::string::npos);
  EXPECT_FALSE(Mapping().valid());
}

}  // namespace
}  // namespace vmm::memory

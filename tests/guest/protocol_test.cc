// The shared-region protocol as both sides compile it: the layout the VMM
// reads, and the page stamp / dirty word functions both sides compute.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <unordered_set>

#include "guest/protocol.h"

namespace vmm::guest {
namespace {

TEST(GuestProtocol, LayoutIsPinned) {
  EXPECT_EQ(offsetof(vmm_guest_shared, magic), 0u);
  EXPECT_EQ(offsetof(vmm_guest_shared, nr_vcpus), 12u);
  EXPECT_EQ(offsetof(vmm_guest_shared, seed), 16u);
  EXPECT_EQ(offsetof(vmm_guest_shared, tsc_khz), 24u);
  EXPECT_EQ(offsetof(vmm_guest_shared, verify_request), 64u);
  EXPECT_EQ(offsetof(vmm_guest_shared, phase), 128u);
  EXPECT_EQ(offsetof(vmm_guest_shared, heartbeat), 136u);
  EXPECT_EQ(offsetof(vmm_guest_shared, stamp_done_tsc), 168u);
  EXPECT_EQ(offsetof(vmm_guest_shared, heartbeat_ring_tsc), 192u);
  EXPECT_EQ(offsetof(vmm_guest_shared, vcpu), 192u + 8 * VMM_GUEST_HEARTBEAT_RING);
  EXPECT_EQ(offsetof(vmm_guest_vcpu, verify_seq), 56u);
  EXPECT_EQ(offsetof(vmm_guest_vcpu, verify_first_mismatch_gpa), 80u);
}

// The sweep fields were appended after vcpu[]: everything before them keeps
// its offset (checked above), so protocol version 1 still describes both.
TEST(GuestProtocol, SweepFieldsFollowTheVcpus) {
  constexpr size_t kVcpusEnd = 192u + 8 * VMM_GUEST_HEARTBEAT_RING + 128 * VMM_GUEST_MAX_VCPUS;
  EXPECT_EQ(VMM_GUEST_SWEEP_RING, 64u);
  EXPECT_EQ(offsetof(vmm_guest_shared, sweep_ms), kVcpusEnd);
  EXPECT_EQ(offsetof(vmm_guest_shared, sweep_passes), kVcpusEnd + 8);
  EXPECT_EQ(offsetof(vmm_guest_shared, sweep_reserved), kVcpusEnd + 16);
  EXPECT_EQ(offsetof(vmm_guest_shared, sweep_ring), kVcpusEnd + 64);
  EXPECT_EQ(sizeof(vmm_guest_sweep), 16u);
  EXPECT_EQ(offsetof(vmm_guest_sweep, start_tsc), 0u);
  EXPECT_EQ(offsetof(vmm_guest_sweep, end_tsc), 8u);
  EXPECT_EQ(sizeof(vmm_guest_shared), kVcpusEnd + 64 + 16 * VMM_GUEST_SWEEP_RING);
  EXPECT_EQ(sizeof(vmm_guest_shared), 7424u);
  EXPECT_EQ(VMM_GUEST_PROTOCOL_VERSION, 1u);
}

TEST(GuestProtocol, StampsDifferPerPageAndSeed) {
  constexpr uint64_t kSeed = 0x0123456789abcdefULL;
  constexpr uint64_t kPages = 1 << 18;  // 1 GiB of 4 KiB pages
  std::unordered_set<uint64_t> stamps;
  for (uint64_t page = 0; page < kPages; page++)
    stamps.insert(vmm_guest_page_stamp(0x200000 + page * 4096, kSeed));
  EXPECT_EQ(stamps.size(), kPages);
  EXPECT_NE(vmm_guest_page_stamp(0x200000, kSeed), vmm_guest_page_stamp(0x200000, kSeed + 1));
  EXPECT_EQ(vmm_guest_page_stamp(0x200000, kSeed), vmm_guest_page_stamp(0x200000, kSeed));
}

TEST(GuestProtocol, DirtyWordsDifferPerPageAndPassAndAreNeverZero) {
  constexpr uint64_t kSeed = 42;
  std::unordered_set<uint64_t> words;
  constexpr uint64_t kPages = 4096;
  constexpr uint64_t kPasses = 16;
  for (uint64_t pass = 1; pass <= kPasses; pass++) {
    for (uint64_t page = 0; page < kPages; page++) {
      const uint64_t word = vmm_guest_dirty_word(0x200000 + page * 4096, kSeed, pass);
      // 0 means "never dirtied" to the verifier.
      EXPECT_NE(word, 0u);
      words.insert(word);
    }
  }
  EXPECT_EQ(words.size(), kPages * kPasses);
}

TEST(GuestProtocol, DirtyWordIsNotTheStamp) {
  // A page whose word 1 were overwritten with its stamp (or vice versa)
  // must not verify by accident.
  for (uint64_t page = 0; page < 4096; page++) {
    const uint64_t gpa = 0x200000 + page * 4096;
    EXPECT_NE(vmm_guest_dirty_word(gpa, 7, 1), vmm_guest_page_stamp(gpa, 7));
  }
}

}  // namespace
}  // namespace vmm::guest

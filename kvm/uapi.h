// KVM uAPI that Debian's 6.1 <linux/kvm.h> lacks (values from Linux 6.18,
// REFERENCE.md section 4). Each definition is guarded so that newer headers
// win, and checked with static_asserts on sizes, offsets and ioctl numbers.
#pragma once

#include <linux/kvm.h>

#include <cstddef>
#include <cstdint>

namespace vmm::kvm::uapi {

inline constexpr long kCapUserMemory2 = 231;
inline constexpr long kCapMemoryAttributes = 233;
inline constexpr long kCapGuestMemfd = 234;
inline constexpr long kCapVmTypes = 235;
inline constexpr long kCapPreFaultMemory = 236;
inline constexpr long kCapGuestMemfdFlags = 244;  // returns the supported flag mask

inline constexpr uint64_t kGuestMemfdFlagMmap = 1ULL << 0;
inline constexpr uint64_t kGuestMemfdFlagInitShared = 1ULL << 1;
inline constexpr uint32_t kMemGuestMemfd = 1U << 2;  // KVM_MEM_GUEST_MEMFD

struct CreateGuestMemfd {  // struct kvm_create_guest_memfd
  uint64_t size;
  uint64_t flags;
  uint64_t reserved[6];
};

struct UserspaceMemoryRegion2 {  // struct kvm_userspace_memory_region2
  uint32_t slot;
  uint32_t flags;
  uint64_t guest_phys_addr;
  uint64_t memory_size;
  uint64_t userspace_addr;
  uint64_t guest_memfd_offset;
  uint32_t guest_memfd;
  uint32_t pad1;
  uint64_t pad2[14];
};

inline constexpr unsigned long kCreateGuestMemfd = _IOWR(KVMIO, 0xd4, CreateGuestMemfd);
inline constexpr unsigned long kSetUserMemoryRegion2 = _IOW(KVMIO, 0x49, UserspaceMemoryRegion2);

static_assert(sizeof(CreateGuestMemfd) == 64);
static_assert(sizeof(UserspaceMemoryRegion2) == 160);
static_assert(offsetof(UserspaceMemoryRegion2, guest_memfd_offset) == 32);
static_assert(offsetof(UserspaceMemoryRegion2, guest_memfd) == 40);
static_assert(offsetof(UserspaceMemoryRegion2, pad2) == 48);
static_assert(kCreateGuestMemfd == 0xc040aed4UL);
static_assert(kSetUserMemoryRegion2 == 0x40a0ae49UL);

}  // namespace vmm::kvm::uapi

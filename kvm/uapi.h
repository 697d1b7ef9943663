// KVM uAPI that Debian's 6.1 <linux/kvm.h> lacks (values from Linux 6.18,
// REFERENCE.md section 4), and the ioctls that header gets wrong in C++.
// Everything is checked with static_asserts on sizes, offsets and ioctl numbers.
//
// Why the second part: the 6.1 uapi headers declare trailing arrays with
// __DECLARE_FLEX_ARRAY, whose empty struct is 1 byte in C++ (0 in C). In C++
// kvm_msrs is 16 bytes instead of 8, kvm_cpuid2 12 instead of 8, kvm_xsave
// 4100 instead of 4096, so the size field of KVM_GET_MSRS, KVM_SET_CPUID2,
// KVM_GET_XSAVE, ... is wrong and KVM rejects the call, and `->entries` sits
// at the wrong offset. Fixed upstream in Linux 6.3; these replace them here.
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

// The C layouts of the variable-length headers: a __u32 count and padding;
// the entries start at byte 8.
struct CountHeader {
  uint32_t count;
  uint32_t pad;
};
struct MsrListHeader {  // struct kvm_msr_list: no padding, indices at byte 4
  uint32_t nmsrs;
};
// struct kvm_xsave: the legacy 4 KiB XSAVE area (KVM_GET_XSAVE / KVM_SET_XSAVE).
struct Xsave {
  uint32_t region[1024];
};

inline constexpr unsigned long kGetMsrIndexList = _IOWR(KVMIO, 0x02, MsrListHeader);
inline constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, CountHeader);
inline constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, CountHeader);
inline constexpr unsigned long kSetMsrs = _IOW(KVMIO, 0x89, CountHeader);
inline constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, CountHeader);
inline constexpr unsigned long kGetCpuid2 = _IOWR(KVMIO, 0x91, CountHeader);
inline constexpr unsigned long kGetXsave = _IOR(KVMIO, 0xa4, Xsave);
inline constexpr unsigned long kSetXsave = _IOW(KVMIO, 0xa5, Xsave);

static_assert(sizeof(Xsave) == 4096);
static_assert(kGetMsrIndexList == 0xc004ae02UL);
static_assert(kGetSupportedCpuid == 0xc008ae05UL);
static_assert(kGetMsrs == 0xc008ae88UL);
static_assert(kSetMsrs == 0x4008ae89UL);
static_assert(kSetCpuid2 == 0x4008ae90UL);
static_assert(kGetCpuid2 == 0xc008ae91UL);
static_assert(kGetXsave == 0x9000aea4UL);
static_assert(kSetXsave == 0x5000aea5UL);
static_assert(sizeof(kvm_msr_entry) == 16 && sizeof(kvm_cpuid_entry2) == 40);

static_assert(sizeof(CreateGuestMemfd) == 64);
static_assert(sizeof(UserspaceMemoryRegion2) == 160);
static_assert(offsetof(UserspaceMemoryRegion2, guest_memfd_offset) == 32);
static_assert(offsetof(UserspaceMemoryRegion2, guest_memfd) == 40);
static_assert(offsetof(UserspaceMemoryRegion2, pad2) == 48);
static_assert(kCreateGuestMemfd == 0xc040aed4UL);
static_assert(kSetUserMemoryRegion2 == 0x40a0ae49UL);

}  // namespace vmm::kvm::uapi

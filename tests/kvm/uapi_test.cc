// The uapi definitions are static_asserts in kvm/uapi.h; these check what a
// static_assert there cannot: agreement with the installed headers and with
// the C layout the kernel uses.
#include "kvm/uapi.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "kvm/msrs.h"

namespace vmm::kvm {
namespace {

TEST(Uapi, GuestMemfdFlagValues) {
  EXPECT_EQ(uapi::kGuestMemfdFlagMmap, 1u);
  EXPECT_EQ(uapi::kGuestMemfdFlagInitShared, 2u);
  EXPECT_EQ(uapi::kMemGuestMemfd, 4u);
  // The guest_memfd memslot flag must not collide with the older ones.
  EXPECT_EQ(uapi::kMemGuestMemfd & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY), 0u);
}

TEST(Uapi, CapabilityNumbersFollowTheHeader) {
  // New capabilities are numbered after the last one this header knows.
  EXPECT_GT(uapi::kCapUserMemory2, KVM_CAP_XSAVE2);
  EXPECT_EQ(uapi::kCapGuestMemfd, 234);
  EXPECT_EQ(uapi::kCapGuestMemfdFlags, 244);
  EXPECT_EQ(uapi::kCapPreFaultMemory, 236);
}

TEST(Uapi, MemoryRegion2StartsLikeMemoryRegion) {
  // KVM_SET_USER_MEMORY_REGION2 extends the old struct; the common prefix is identical.
  EXPECT_EQ(offsetof(uapi::UserspaceMemoryRegion2, slot), offsetof(kvm_userspace_memory_region, slot));
  EXPECT_EQ(offsetof(uapi::UserspaceMemoryRegion2, flags), offsetof(kvm_userspace_memory_region, flags));
  EXPECT_EQ(offsetof(uapi::UserspaceMemoryRegion2, guest_phys_addr),
            offsetof(kvm_userspace_memory_region, guest_phys_addr));
  EXPECT_EQ(offsetof(uapi::UserspaceMemoryRegion2, memory_size),
            offsetof(kvm_userspace_memory_region, memory_size));
  EXPECT_EQ(offsetof(uapi::UserspaceMemoryRegion2, userspace_addr),
            offsetof(kvm_userspace_memory_region, userspace_addr));
  EXPECT_EQ(sizeof(kvm_userspace_memory_region), offsetof(uapi::UserspaceMemoryRegion2, guest_memfd_offset));
}

TEST(Uapi, NewIoctlsDecode) {
  EXPECT_EQ(_IOC_TYPE(uapi::kCreateGuestMemfd), static_cast<unsigned>(KVMIO));
  EXPECT_EQ(_IOC_NR(uapi::kCreateGuestMemfd), 0xd4u);
  EXPECT_EQ(_IOC_SIZE(uapi::kCreateGuestMemfd), sizeof(uapi::CreateGuestMemfd));
  EXPECT_EQ(_IOC_DIR(uapi::kCreateGuestMemfd), static_cast<unsigned>(_IOC_READ | _IOC_WRITE));
  EXPECT_EQ(_IOC_NR(uapi::kSetUserMemoryRegion2), 0x49u);
  EXPECT_EQ(_IOC_SIZE(uapi::kSetUserMemoryRegion2), 160u);
  EXPECT_EQ(_IOC_DIR(uapi::kSetUserMemoryRegion2), static_cast<unsigned>(_IOC_WRITE));
#ifdef KVM_CREATE_GUEST_MEMFD  // newer headers: ours must agree with theirs
  EXPECT_EQ(uapi::kCreateGuestMemfd, static_cast<unsigned long>(KVM_CREATE_GUEST_MEMFD));
  EXPECT_EQ(uapi::kSetUserMemoryRegion2, static_cast<unsigned long>(KVM_SET_USER_MEMORY_REGION2));
#endif
}

TEST(Uapi, VariableLengthIoctlsUseTheCLayout) {
  // The values a C compiler derives from <linux/kvm.h>: the size field is the
  // 8-byte header (4 for kvm_msr_list), not the C++ size of the header type.
  EXPECT_EQ(_IOC_SIZE(uapi::kGetMsrs), 8u);
  EXPECT_EQ(_IOC_SIZE(uapi::kSetCpuid2), 8u);
  EXPECT_EQ(_IOC_SIZE(uapi::kGetMsrIndexList), 4u);
  EXPECT_EQ(_IOC_SIZE(uapi::kGetXsave), 4096u);
  EXPECT_EQ(_IOC_NR(uapi::kGetMsrs), _IOC_NR(KVM_GET_MSRS));
  EXPECT_EQ(_IOC_NR(uapi::kSetMsrs), _IOC_NR(KVM_SET_MSRS));
  EXPECT_EQ(_IOC_NR(uapi::kGetCpuid2), _IOC_NR(KVM_GET_CPUID2));
  EXPECT_EQ(_IOC_NR(uapi::kSetXsave), _IOC_NR(KVM_SET_XSAVE));
  EXPECT_EQ(_IOC_NR(uapi::kGetSupportedCpuid), _IOC_NR(KVM_GET_SUPPORTED_CPUID));
}

TEST(Uapi, FixedSizeIoctlsOfTheHeaderMatchC) {
  // Structs without trailing arrays have the same size in C and C++, so the
  // header's own macros are right for them (values from a C compiler).
  EXPECT_EQ(KVM_RUN, 0xae80UL);
  EXPECT_EQ(KVM_GET_REGS, 0x8090ae81UL);
  EXPECT_EQ(KVM_SET_SREGS, 0x4138ae84UL);
  EXPECT_EQ(KVM_GET_FPU, 0x81a0ae8cUL);
  EXPECT_EQ(KVM_GET_LAPIC, 0x8400ae8eUL);
  EXPECT_EQ(KVM_GET_MP_STATE, 0x8004ae98UL);
  EXPECT_EQ(KVM_GET_VCPU_EVENTS, 0x8040ae9fUL);
  EXPECT_EQ(KVM_GET_DEBUGREGS, 0x8080aea1UL);
  EXPECT_EQ(KVM_GET_XCRS, 0x8188aea6UL);
  EXPECT_EQ(KVM_GET_IRQCHIP, 0xc208ae62UL);
  EXPECT_EQ(KVM_GET_PIT2, 0x8070ae9fUL);
  EXPECT_EQ(KVM_GET_CLOCK, 0x8030ae7cUL);
}

TEST(Msrs, WorthSavingListIsClean) {
  const auto msrs = msrs_worth_saving();
  const std::set<uint32_t> unique(msrs.begin(), msrs.end());
  EXPECT_EQ(unique.size(), msrs.size()) << "duplicate MSR in the list";
  // EFER and APIC_BASE travel in kvm_sregs; setting them twice could disagree.
  EXPECT_FALSE(unique.contains(0xc0000080)) << "EFER is in kvm_sregs";
  EXPECT_FALSE(unique.contains(0x1b)) << "APIC_BASE is in kvm_sregs";
  for (uint32_t index : {msr::kTsc, msr::kLstar, msr::kStar, msr::kKernelGsBase, msr::kPat,
                         msr::kKvmSystemTime, msr::kTscDeadline}) {
    EXPECT_TRUE(unique.contains(index)) << std::hex << index;
  }
}

}  // namespace
}  // namespace vmm::kvm

#include "kvm/system.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "kvm/msrs.h"
#include "kvm/uapi.h"
#include "tests/kvm/kvm_test_support.h"

namespace vmm::kvm {
namespace {

using testing::KvmTest;

TEST(System, MissingDeviceSaysThereIsNoKvm) {
  auto system = System::open("/nonexistent/kvm");
  ASSERT_FALSE(system);
  EXPECT_EQ(system.error().code, ENOENT);
  EXPECT_NE(system.error().message.find("not found: this host has no KVM"), std::string::npos)
      << system.error().message;
}

TEST(System, NonKvmDeviceFailsWithTheIoctlNamed) {
  UniqueFd file(::memfd_create("not-kvm", MFD_CLOEXEC));
  ASSERT_TRUE(file.valid());
  auto system = System::open("/proc/self/fd/" + std::to_string(file.get()));
  ASSERT_FALSE(system);
  EXPECT_NE(system.error().message.find("KVM_GET_VCPU_MMAP_SIZE"), std::string::npos);
}

TEST_F(KvmTest, ProbeReportsWhatTheVmmNeeds) {
  auto caps = system().probe();
  ASSERT_TRUE(caps) << caps.error().describe();
  EXPECT_EQ(caps->api_version, 12);
  EXPECT_GE(caps->vcpu_mmap_size, static_cast<int>(sizeof(kvm_run)));
  EXPECT_GE(caps->max_vcpus, caps->nr_vcpus);
  EXPECT_GT(caps->nr_vcpus, 0);
  EXPECT_TRUE(caps->user_memory2 && caps->irqchip && caps->pit2 && caps->immediate_exit);
}

TEST_F(KvmTest, ProbeReportsGuestMemfdFlags) {
  auto caps = system().probe();
  ASSERT_TRUE(caps) << caps.error().describe();
  if (!caps->guest_memfd_mmap()) {
    GTEST_SKIP() << "this host's KVM lacks guest_memfd MMAP|INIT_SHARED (flags "
                 << caps->guest_memfd_flags << ")";
  }
  EXPECT_TRUE(caps->guest_memfd);
  EXPECT_EQ(caps->guest_memfd_flags & uapi::kGuestMemfdFlagMmap, uapi::kGuestMemfdFlagMmap);
  EXPECT_EQ(caps->guest_memfd_flags & uapi::kGuestMemfdFlagInitShared,
            uapi::kGuestMemfdFlagInitShared);
  auto raw = system().check_extension(uapi::kCapGuestMemfdFlags);
  ASSERT_TRUE(raw);
  EXPECT_EQ(static_cast<uint64_t>(*raw), caps->guest_memfd_flags);
}

TEST_F(KvmTest, SupportedCpuidHasTheBasicLeaves) {
  auto cpuid = system().supported_cpuid();
  ASSERT_TRUE(cpuid) << cpuid.error().describe();
  auto has_leaf = [&](uint32_t function) {
    return std::ranges::any_of(*cpuid, [&](const kvm_cpuid_entry2& e) { return e.function == function; });
  };
  EXPECT_TRUE(has_leaf(0));
  EXPECT_TRUE(has_leaf(1));
  EXPECT_TRUE(has_leaf(0x80000000));
}

TEST_F(KvmTest, MsrsToSaveAreListedByKvm) {
  auto listed = system().msr_index_list();
  ASSERT_TRUE(listed) << listed.error().describe();
  EXPECT_FALSE(listed->empty());
  auto to_save = system().msrs_to_save();
  ASSERT_TRUE(to_save) << to_save.error().describe();
  for (uint32_t index : *to_save) {
    EXPECT_NE(std::ranges::find(*listed, index), listed->end()) << std::hex << index;
  }
  // Guest state every x86-64 guest has: must be saved on any KVM.
  for (uint32_t index : {msr::kTsc, msr::kLstar, msr::kStar, msr::kKernelGsBase}) {
    EXPECT_NE(std::ranges::find(*to_save, index), to_save->end()) << std::hex << index;
  }
}

TEST_F(KvmTest, CreatesVmWithIrqchipAndPit) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  EXPECT_TRUE(vm->fd().valid());
  EXPECT_EQ(vm->vcpu_mmap_size(), system().vcpu_mmap_size());
  // The VM fd is close-on-exec: a VM fd is useless in another process anyway.
  EXPECT_EQ(::fcntl(vm->fd().get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
}

}  // namespace
}  // namespace vmm::kvm

#include "kvm/vm.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "kvm/uapi.h"
#include "tests/kvm/kvm_test_support.h"

namespace vmm::kvm {
namespace {

constexpr uint64_t kGuestMemfdFlags = uapi::kGuestMemfdFlagMmap | uapi::kGuestMemfdFlagInitShared;
constexpr uint64_t kSize = 2ULL << 20;

class VmTest : public testing::KvmTest {
 protected:
  void SetUp() override {
    KvmTest::SetUp();
    if (IsSkipped()) return;
    auto caps = system().probe();
    ASSERT_TRUE(caps) << caps.error().describe();
    has_guest_memfd_mmap_ = caps->guest_memfd_mmap();
  }
  bool has_guest_memfd_mmap_ = false;
};

// An anonymous shared mapping for ordinary memslots.
struct AnonymousMemory {
  explicit AnonymousMemory(size_t size)
      : size(size), data(::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)) {}
  ~AnonymousMemory() { ::munmap(data, size); }
  size_t size;
  void* data;
};

// KVM refuses a VM to every process but its creator (a LUO retrieve makes
// the retriever the creator): a second `vmm restore` has to know.
TEST_F(VmTest, VmIsUsableOnlyByTheProcessThatCreatedIt) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto here = Vm::usable_by_this_process(vm->fd());
  ASSERT_TRUE(here) << here.error().describe();
  EXPECT_TRUE(*here);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto there = Vm::usable_by_this_process(vm->fd());
    ::_exit(!there ? 2 : *there ? 1 : 0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: the child could use its parent's VM; 2: the check failed";

  auto closed = Vm::usable_by_this_process(FdRef(-1));
  ASSERT_FALSE(closed);
  EXPECT_EQ(closed.error().code, EBADF);
}

TEST_F(VmTest, GuestMemfdRejectsUnalignedSize) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto gmem = vm->create_guest_memfd(kSize + 1, kGuestMemfdFlags);
  ASSERT_FALSE(gmem);
  EXPECT_EQ(gmem.error().code, EINVAL);
  EXPECT_NE(gmem.error().message.find("page size"), std::string::npos) << gmem.error().message;
}

TEST_F(VmTest, GuestMemfdIsPreallocatedMappableAndCloseOnExec) {
  if (!has_guest_memfd_mmap_) GTEST_SKIP() << "this host's KVM lacks guest_memfd mmap";
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto gmem = vm->create_guest_memfd(kSize, kGuestMemfdFlags);
  ASSERT_TRUE(gmem) << gmem.error().describe();
  EXPECT_EQ(gmem->size(), kSize);
  EXPECT_EQ(gmem->flags(), kGuestMemfdFlags);
  EXPECT_EQ(::fcntl(gmem->fd().get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  auto allocated = gmem->preallocate();
  ASSERT_TRUE(allocated) << allocated.error().describe();

  struct stat file_stat{};
  ASSERT_EQ(::fstat(gmem->fd().get(), &file_stat), 0);
  EXPECT_EQ(static_cast<uint64_t>(file_stat.st_size), kSize);

  // INIT_SHARED: the whole file is host-accessible through any mapping.
  void* first = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, gmem->fd().get(), 0);
  void* second = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, gmem->fd().get(), 0);
  ASSERT_NE(first, MAP_FAILED);
  ASSERT_NE(second, MAP_FAILED);
  std::memcpy(static_cast<char*>(first) + 4096, "guest_memfd", 12);
  EXPECT_STREQ(static_cast<char*>(second) + 4096, "guest_memfd");
  ::munmap(first, kSize);
  ::munmap(second, kSize);

  UniqueFd taken = std::move(*gmem).take_fd();
  EXPECT_TRUE(taken.valid());
}

TEST_F(VmTest, GuestMemfdBindsOnlyToItsOwnVm) {
  if (!has_guest_memfd_mmap_) GTEST_SKIP() << "this host's KVM lacks guest_memfd mmap";
  auto owner = make_vm();
  auto other = make_vm();
  ASSERT_TRUE(owner && other);
  auto gmem = owner->create_guest_memfd(kSize, kGuestMemfdFlags);
  ASSERT_TRUE(gmem) << gmem.error().describe();
  void* host = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, gmem->fd().get(), 0);
  ASSERT_NE(host, MAP_FAILED);

  MemorySlot slot{.slot = 0, .guest_phys_addr = 0, .size = kSize, .host_address = host,
                  .guest_memfd = gmem->fd()};
  auto own = owner->set_memory_slot(slot);
  EXPECT_TRUE(own) << own.error().describe();

  // The live update relies on this: another VM cannot take the file as a
  // guest_memfd slot (EINVAL), only as an ordinary slot on its mapping.
  auto foreign = other->set_memory_slot(slot);
  ASSERT_FALSE(foreign);
  EXPECT_EQ(foreign.error().code, EINVAL);
  EXPECT_NE(foreign.error().message.find("KVM_SET_USER_MEMORY_REGION2(slot 0"), std::string::npos)
      << foreign.error().message;
  slot.guest_memfd = FdRef();
  auto ordinary = other->set_memory_slot(slot);
  EXPECT_TRUE(ordinary) << ordinary.error().describe();

  EXPECT_TRUE(owner->clear_memory_slot(0));
  EXPECT_TRUE(other->clear_memory_slot(0));
  ::munmap(host, kSize);
}

TEST_F(VmTest, OverlappingSlotFailsNamingTheSlot) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  AnonymousMemory memory(kSize);
  ASSERT_TRUE(vm->set_memory_slot({.slot = 0, .guest_phys_addr = 0, .size = kSize,
                                   .host_address = memory.data}));
  auto overlap = vm->set_memory_slot({.slot = 1, .guest_phys_addr = kSize / 2, .size = kSize,
                                      .host_address = memory.data});
  ASSERT_FALSE(overlap);
  EXPECT_EQ(overlap.error().code, EEXIST);
  EXPECT_NE(overlap.error().message.find("slot 1"), std::string::npos) << overlap.error().message;
  // Once slot 0 is gone the range is free again.
  ASSERT_TRUE(vm->clear_memory_slot(0));
  EXPECT_TRUE(vm->set_memory_slot({.slot = 1, .guest_phys_addr = kSize / 2, .size = kSize,
                                   .host_address = memory.data}));
}

TEST_F(VmTest, IrqLineOnTheInKernelIrqchip) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  EXPECT_TRUE(vm->set_irq_line(4, true));
  EXPECT_TRUE(vm->set_irq_line(4, false));
}

TEST_F(VmTest, SaveRestoreIrqchipPitAndClock) {
  auto source = make_vm();
  auto target = make_vm();
  ASSERT_TRUE(source && target);
  auto initial = source->save();
  ASSERT_TRUE(initial) << initial.error().describe();

  // Give every part a recognisable value.
  VmState modified = *initial;
  modified.pic_master.imr = 0xfa;
  modified.pic_slave.imr = 0x7f;
  modified.ioapic.redirtbl[3].bits = (1ULL << 16) | 0x33;  // masked, vector 0x33
  modified.pit.channels[0].count = 0x1234;
  modified.clock.clock = 10'000'000'000ULL;  // 10 s of guest time
  // Flags as a host with a TSC clocksource reports them; honouring REALTIME
  // with this ancient timestamp would jump the clock by decades.
  modified.clock.flags = KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME;
  modified.clock.realtime = 1;
  auto applied = source->restore(modified);
  ASSERT_TRUE(applied) << applied.error().describe();

  auto saved = source->save();
  ASSERT_TRUE(saved) << saved.error().describe();
  EXPECT_EQ(saved->pic_master.imr, 0xfa);
  EXPECT_EQ(saved->pic_slave.imr, 0x7f);
  EXPECT_EQ(saved->ioapic.redirtbl[3].bits, (1ULL << 16) | 0x33);
  EXPECT_EQ(saved->pit.channels[0].count, 0x1234);
  EXPECT_GE(saved->clock.clock, 10'000'000'000ULL);
  EXPECT_LT(saved->clock.clock, 15'000'000'000ULL);

  // Into a brand-new VM, as after a live update.
  auto restored = target->restore(*saved);
  ASSERT_TRUE(restored) << restored.error().describe();
  auto copy = target->save();
  ASSERT_TRUE(copy) << copy.error().describe();
  EXPECT_EQ(std::memcmp(&copy->pic_master, &saved->pic_master, sizeof(kvm_pic_state)), 0);
  EXPECT_EQ(std::memcmp(&copy->pic_slave, &saved->pic_slave, sizeof(kvm_pic_state)), 0);
  EXPECT_EQ(std::memcmp(&copy->ioapic, &saved->ioapic, sizeof(kvm_ioapic_state)), 0);
  EXPECT_EQ(copy->pit.channels[0].count, 0x1234);
  EXPECT_EQ(copy->pit.channels[0].mode, saved->pit.channels[0].mode);
  EXPECT_GE(copy->clock.clock, saved->clock.clock);
  EXPECT_LT(copy->clock.clock, saved->clock.clock + 5'000'000'000ULL);
}

}  // namespace
}  // namespace vmm::kvm

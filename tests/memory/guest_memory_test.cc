// Integration tests on the real /dev/kvm: guest memory in guest_memfd and
// memfd, seen the same way by the host, a re-mmap of the file, a guest, and a
// second VM the files are attached to (what the live update does).
#include "memory/guest_memory.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <array>
#include <cstring>

#include "kvm/uapi.h"
#include "tests/kvm/kvm_test_support.h"

namespace vmm::memory {
namespace {

constexpr uint64_t MiB = 1ULL << 20;
constexpr uint64_t kRamSize = 64 * MiB;
constexpr uint64_t kSharedSize = 4 * MiB;
constexpr uint64_t kCodeGpa = 0x1000;
constexpr uint64_t kDataGpa = 0x2000;
constexpr uint16_t kReportPort = 0x10;

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

std::span<const uint8_t> as_bytes(std::string_view text) {
  return {reinterpret_cast<const uint8_t*>(text.data()), text.size()};
}

class GuestMemoryTest : public kvm::testing::KvmTest {
 protected:
  void SetUp() override {
    KvmTest::SetUp();
    if (IsSkipped()) return;
    auto caps = system().probe();
    ASSERT_TRUE(caps) << caps.error().describe();
    if (!caps->guest_memfd_mmap()) {
      GTEST_SKIP() << "this host's KVM lacks guest_memfd MMAP|INIT_SHARED";
    }
  }

  static MemoryLayout layout(Backing backing = Backing::guest_memfd) {
    return MemoryLayout::plan(kRamSize, kSharedSize, backing).value();
  }

  // Runs real-mode code on a new vCPU of `vm` that reads the byte at kDataGpa
  // and reports it with OUT: what the guest sees at that address.
  static Result<uint8_t> guest_reads_data_byte(kvm::Vm& vm, const GuestMemory& memory,
                                               uint32_t vcpu_id = 0) {
    static constexpr uint8_t kCode[] = {
        0xa0, kDataGpa & 0xff, kDataGpa >> 8,  // mov al, [kDataGpa]
        0xe6, kReportPort,                     // out kReportPort, al
        0xeb, 0xfe,                            // jmp $
    };
    VMM_TRY(memory.write(kCodeGpa, kCode));
    VMM_TRY_ASSIGN(vcpu, vm.create_vcpu(vcpu_id));
    VMM_TRY_ASSIGN(sregs, vcpu.get_sregs());
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    VMM_TRY(vcpu.set_sregs(sregs));
    kvm_regs regs{};
    regs.rip = kCodeGpa;
    regs.rflags = 0x2;
    VMM_TRY(vcpu.set_regs(regs));
    VMM_TRY(vcpu.run());
    const kvm_run& run = vcpu.run_data();
    if (run.exit_reason != KVM_EXIT_IO || run.io.port != kReportPort) {
      return fail("guest did not report: exit reason " + std::to_string(run.exit_reason));
    }
    return reinterpret_cast<const uint8_t*>(&run)[run.io.data_offset];
  }

  // Duplicates of the region files, in layout order, as a live update hands them over.
  static std::vector<UniqueFd> duplicate_files(const GuestMemory& memory) {
    std::vector<UniqueFd> files;
    for (const auto& region : memory.regions()) {
      files.emplace_back(::fcntl(region->fd().get(), F_DUPFD_CLOEXEC, 0));
      EXPECT_TRUE(files.back().valid());
    }
    return files;
  }
};

TEST_F(GuestMemoryTest, CreateRegistersGuestMemfdRamAndMemfdShared) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto memory = GuestMemory::create(*vm, layout());
  ASSERT_TRUE(memory) << memory.error().describe();
  EXPECT_EQ(memory->layout(), layout());
  ASSERT_EQ(memory->regions().size(), 2u);
  const Region* ram = memory->region("ram0");
  const Region* shared = memory->region("shared");
  ASSERT_TRUE(ram && shared);
  EXPECT_EQ(ram->slot_kind(), SlotKind::guest_memfd);
  EXPECT_EQ(shared->slot_kind(), SlotKind::userspace);
  EXPECT_EQ(memory->region("ram1"), nullptr);
  for (const auto& region : memory->regions()) {
    EXPECT_EQ(::fcntl(region->fd().get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC) << region->spec().name;
    struct stat file_stat{};
    ASSERT_EQ(::fstat(region->fd().get(), &file_stat), 0);
    EXPECT_EQ(static_cast<uint64_t>(file_stat.st_size), region->size());
  }
  // The shared memfd can be sealed by the live update.
  EXPECT_EQ(::fcntl(shared->fd().get(), F_GET_SEALS), 0);
}

TEST_F(GuestMemoryTest, FindAndTranslateFollowTheLayout) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto memory = GuestMemory::create(*vm, layout());
  ASSERT_TRUE(memory) << memory.error().describe();
  const Region* ram = memory->region("ram0");
  const Region* shared = memory->region("shared");

  EXPECT_EQ(memory->find(0), ram);
  EXPECT_EQ(memory->find(kRamSize - 1), ram);
  EXPECT_EQ(memory->find(kRamSize), nullptr);
  EXPECT_EQ(memory->find(kSharedRegionGpa - 1), nullptr);
  EXPECT_EQ(memory->find(kSharedRegionGpa), shared);
  EXPECT_EQ(memory->find(kSharedRegionGpa + kSharedSize - 1), shared);
  EXPECT_EQ(memory->find(kSharedRegionGpa + kSharedSize), nullptr);

  auto view = memory->translate(kDataGpa, 16);
  ASSERT_TRUE(view) << view.error().describe();
  EXPECT_EQ(view->data(), ram->host() + kDataGpa);
  EXPECT_EQ(view->size(), 16u);
  EXPECT_TRUE(memory->translate(kRamSize - 16, 16));

  auto outside = memory->translate(kRamSize + 4096, 1);
  ASSERT_FALSE(outside);
  EXPECT_EQ(outside.error().code, EFAULT);
  auto crossing = memory->translate(kRamSize - 8, 16);
  ASSERT_FALSE(crossing);
  EXPECT_TRUE(contains(crossing.error().message, "ram0")) << crossing.error().message;
  std::array<uint8_t, 4> out{};
  EXPECT_FALSE(memory->read(kSharedRegionGpa + kSharedSize - 2, out));
}

TEST_F(GuestMemoryTest, ReadWriteRoundTripThroughHostMappingAndReMmap) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto memory = GuestMemory::create(*vm, layout());
  ASSERT_TRUE(memory) << memory.error().describe();

  for (const uint64_t gpa : {kDataGpa, kRamSize - 4096, kSharedRegionGpa + 0x100}) {
    const std::string text = "bytes at " + std::to_string(gpa);
    ASSERT_TRUE(memory->write(gpa, as_bytes(text)));
    std::string back(text.size(), '\0');
    ASSERT_TRUE(memory->read(gpa, {reinterpret_cast<uint8_t*>(back.data()), back.size()}));
    EXPECT_EQ(back, text);

    // A fresh mapping of the region's file sees the same bytes: the data is
    // in the file, not in this process (what survives a VMM upgrade).
    const Region* region = memory->find(gpa);
    auto remapped = Mapping::map_shared(region->fd(), region->size());
    ASSERT_TRUE(remapped) << remapped.error().describe();
    EXPECT_EQ(std::memcmp(remapped->data() + (gpa - region->gpa()), text.data(), text.size()), 0);
    remapped->data()[gpa - region->gpa()] = 'B';
    auto view = memory->translate(gpa, 1);
    ASSERT_TRUE(view);
    EXPECT_EQ((*view)[0], 'B');
  }
}

TEST_F(GuestMemoryTest, GuestSeesWhatTheHostWrote) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto memory = GuestMemory::create(*vm, layout());
  ASSERT_TRUE(memory) << memory.error().describe();
  const uint8_t value[] = {0x5a};
  ASSERT_TRUE(memory->write(kDataGpa, value));
  auto seen = guest_reads_data_byte(*vm, *memory);
  ASSERT_TRUE(seen) << seen.error().describe();
  EXPECT_EQ(*seen, 0x5a);
}

TEST_F(GuestMemoryTest, MemfdBackingIsPreallocatedAndSealable) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto memory = GuestMemory::create(*vm, layout(Backing::memfd));
  ASSERT_TRUE(memory) << memory.error().describe();
  const Region* ram = memory->region("ram0");
  ASSERT_NE(ram, nullptr);
  EXPECT_EQ(ram->slot_kind(), SlotKind::userspace);
  EXPECT_EQ(::fcntl(ram->fd().get(), F_GET_SEALS), 0);
  struct stat file_stat{};
  ASSERT_EQ(::fstat(ram->fd().get(), &file_stat), 0);
  EXPECT_GE(static_cast<uint64_t>(file_stat.st_blocks) * 512, kRamSize) << "not preallocated";
  const uint8_t value[] = {0xa5};
  ASSERT_TRUE(memory->write(kDataGpa, value));
  auto seen = guest_reads_data_byte(*vm, *memory);
  ASSERT_TRUE(seen) << seen.error().describe();
  EXPECT_EQ(*seen, 0xa5);
}

TEST_F(GuestMemoryTest, AttachToASecondVmSeesTheSameData) {
  auto first_vm = make_vm();
  auto second_vm = make_vm();
  ASSERT_TRUE(first_vm && second_vm);
  auto first = GuestMemory::create(*first_vm, layout());
  ASSERT_TRUE(first) << first.error().describe();
  const uint8_t value[] = {0x42};
  ASSERT_TRUE(first->write(kDataGpa, value));
  ASSERT_TRUE(first->write(kSharedRegionGpa, as_bytes("shared")));

  const int fds_before = kvm::testing::count_open_fds();
  auto second = GuestMemory::attach(*second_vm, layout(), duplicate_files(*first), SlotKind::userspace);
  ASSERT_TRUE(second) << second.error().describe();
  EXPECT_EQ(kvm::testing::count_open_fds(), fds_before + 2);  // the attached files
  for (const auto& region : second->regions()) EXPECT_EQ(region->slot_kind(), SlotKind::userspace);

  // The host sees the same bytes in both, the contents untouched by attach...
  auto ram_before = first->translate(0, kRamSize);
  auto ram_after = second->translate(0, kRamSize);
  ASSERT_TRUE(ram_before && ram_after);
  EXPECT_EQ(std::memcmp(ram_before->data(), ram_after->data(), kRamSize), 0);
  std::array<uint8_t, 6> shared{};
  ASSERT_TRUE(second->read(kSharedRegionGpa, shared));
  EXPECT_EQ(std::string_view(reinterpret_cast<const char*>(shared.data()), shared.size()), "shared");
  // ...and so does the second VM's guest.
  auto seen = guest_reads_data_byte(*second_vm, *second);
  ASSERT_TRUE(seen) << seen.error().describe();
  EXPECT_EQ(*seen, 0x42);
  // A write through either is visible through the other: one file.
  const uint8_t update[] = {0x43};
  ASSERT_TRUE(second->write(kDataGpa, update));
  std::array<uint8_t, 1> back{};
  ASSERT_TRUE(first->read(kDataGpa, back));
  EXPECT_EQ(back[0], 0x43);
}

TEST_F(GuestMemoryTest, GuestMemfdCannotBeAGuestMemfdSlotOfASecondVm) {
  auto first_vm = make_vm();
  auto second_vm = make_vm();
  ASSERT_TRUE(first_vm && second_vm);
  auto first = GuestMemory::create(*first_vm, layout());
  ASSERT_TRUE(first) << first.error().describe();

  const int fds_before = kvm::testing::count_open_fds();
  auto second = GuestMemory::attach(*second_vm, layout(), duplicate_files(*first),
                                    SlotKind::guest_memfd);
  ASSERT_FALSE(second);
  // A fact the live update relies on: KVM binds a guest_memfd to one VM only.
  EXPECT_EQ(second.error().code, EINVAL);
  EXPECT_TRUE(contains(second.error().message, "region 'ram0'")) << second.error().message;
  EXPECT_EQ(kvm::testing::count_open_fds(), fds_before) << "attach leaked descriptors";

  // Nothing stayed registered: the same files attach as ordinary slots.
  auto retry = GuestMemory::attach(*second_vm, layout(), duplicate_files(*first), SlotKind::userspace);
  EXPECT_TRUE(retry) << retry.error().describe();
}

TEST_F(GuestMemoryTest, AttachChecksTheFilesAgainstTheLayout) {
  auto first_vm = make_vm();
  auto second_vm = make_vm();
  ASSERT_TRUE(first_vm && second_vm);
  auto first = GuestMemory::create(*first_vm, layout());
  ASSERT_TRUE(first) << first.error().describe();

  std::vector<UniqueFd> swapped = duplicate_files(*first);
  std::swap(swapped[0], swapped[1]);
  auto wrong_order = GuestMemory::attach(*second_vm, layout(), std::move(swapped), SlotKind::userspace);
  ASSERT_FALSE(wrong_order);
  EXPECT_EQ(wrong_order.error().code, EINVAL);
  EXPECT_TRUE(contains(wrong_order.error().message, "region 'ram0'")) << wrong_order.error().message;
  EXPECT_TRUE(contains(wrong_order.error().message, std::to_string(kSharedSize)))
      << wrong_order.error().message;

  std::vector<UniqueFd> too_few = duplicate_files(*first);
  too_few.pop_back();
  auto missing = GuestMemory::attach(*second_vm, layout(), std::move(too_few), SlotKind::userspace);
  ASSERT_FALSE(missing);
  EXPECT_TRUE(contains(missing.error().message, "1 files for 2 memory regions"))
      << missing.error().message;
}

TEST_F(GuestMemoryTest, RamTheHostCannotGiveFailsCleanly) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto huge = MemoryLayout::plan(1ULL << 40, kSharedSize, Backing::guest_memfd);
  ASSERT_TRUE(huge) << huge.error().describe();
  const int fds_before = kvm::testing::count_open_fds();
  auto memory = GuestMemory::create(*vm, *huge);
  ASSERT_FALSE(memory);
  EXPECT_EQ(memory.error().code, ENOMEM);
  EXPECT_TRUE(contains(memory.error().message, "1 TiB")) << memory.error().message;
  EXPECT_TRUE(contains(memory.error().message, "cannot provide")) << memory.error().message;
  EXPECT_EQ(kvm::testing::count_open_fds(), fds_before);
  // The VM is still usable for a layout that fits.
  EXPECT_TRUE(GuestMemory::create(*vm, layout()));
}

TEST_F(GuestMemoryTest, LateFailureUnregistersEarlierSlots) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  // Something already sits where the shared region goes: ram0 is created and
  // registered, then the shared slot fails.
  void* squatter = ::mmap(nullptr, kSharedSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(squatter, MAP_FAILED);
  ASSERT_TRUE(vm->set_memory_slot({.slot = 10, .guest_phys_addr = kSharedRegionGpa,
                                   .size = kSharedSize, .host_address = squatter}));
  const int fds_before = kvm::testing::count_open_fds();
  auto memory = GuestMemory::create(*vm, layout());
  ASSERT_FALSE(memory);
  EXPECT_EQ(memory.error().code, EEXIST);
  EXPECT_TRUE(contains(memory.error().message, "region 'shared'")) << memory.error().message;
  EXPECT_EQ(kvm::testing::count_open_fds(), fds_before) << "create leaked descriptors";

  // ram0's slot is gone: its GPA range is free for another slot.
  void* other = ::mmap(nullptr, kRamSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(other, MAP_FAILED);
  auto reuse = vm->set_memory_slot({.slot = 20, .guest_phys_addr = 0, .size = kRamSize,
                                    .host_address = other});
  EXPECT_TRUE(reuse) << reuse.error().describe();
  ASSERT_TRUE(vm->clear_memory_slot(20));
  ASSERT_TRUE(vm->clear_memory_slot(10));
  ::munmap(other, kRamSize);
  ::munmap(squatter, kSharedSize);
}

TEST_F(GuestMemoryTest, MovedGuestMemoryKeepsItsLookups) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto created = GuestMemory::create(*vm, layout());
  ASSERT_TRUE(created) << created.error().describe();
  const Region* ram = created->region("ram0");
  GuestMemory moved(std::move(*created));
  EXPECT_EQ(created->find(0), nullptr);  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(moved.find(0), ram);

  auto other_vm = make_vm();
  ASSERT_TRUE(other_vm);
  auto replaced = GuestMemory::create(*other_vm, layout(Backing::memfd));
  ASSERT_TRUE(replaced) << replaced.error().describe();
  *replaced = std::move(moved);
  EXPECT_EQ(replaced->find(0), ram);
  EXPECT_EQ(replaced->find(kSharedRegionGpa), replaced->region("shared"));
}

}  // namespace
}  // namespace vmm::memory

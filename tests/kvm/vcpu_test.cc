#include "kvm/vcpu.h"

#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "kvm/msrs.h"
#include "tests/kvm/kvm_test_support.h"

namespace vmm::kvm {
namespace {

class VcpuTest : public testing::KvmTest {
 protected:
  // A vCPU with the host's supported CPUID, as the VMM sets it up.
  Result<Vcpu> make_vcpu(Vm& vm, uint32_t id) {
    VMM_TRY_ASSIGN(vcpu, vm.create_vcpu(id));
    VMM_TRY_ASSIGN(cpuid, system().supported_cpuid());
    VMM_TRY(vcpu.set_cpuid(cpuid));
    return vcpu;
  }
};

const kvm_cpuid_entry2* find_leaf(const std::vector<kvm_cpuid_entry2>& cpuid, uint32_t function,
                                  uint32_t index = 0) {
  auto it = std::ranges::find_if(cpuid, [&](const kvm_cpuid_entry2& e) {
    return e.function == function && e.index == index;
  });
  return it == cpuid.end() ? nullptr : &*it;
}

template <class T>
bool same_bytes(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

TEST_F(VcpuTest, SetCpuidPutsTheVcpuIdInTheApicIdFields) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto vcpu = make_vcpu(*vm, 3);
  ASSERT_TRUE(vcpu) << vcpu.error().describe();
  EXPECT_EQ(vcpu->id(), 3u);
  auto cpuid = vcpu->get_cpuid();
  ASSERT_TRUE(cpuid) << cpuid.error().describe();
  const kvm_cpuid_entry2* leaf1 = find_leaf(*cpuid, 1);
  ASSERT_NE(leaf1, nullptr);
  EXPECT_EQ(leaf1->ebx >> 24, 3u);  // what the test guest reads as its CPU index
  if (const kvm_cpuid_entry2* leaf_b = find_leaf(*cpuid, 0xb)) {
    EXPECT_EQ(leaf_b->edx, 3u);
  }
}

TEST_F(VcpuTest, SaveRestoreRoundTripIntoAnotherVm) {
  auto source_vm = make_vm();
  auto target_vm = make_vm();
  ASSERT_TRUE(source_vm && target_vm);
  auto source = make_vcpu(*source_vm, 0);
  ASSERT_TRUE(source) << source.error().describe();
  auto msr_indices = system().msrs_to_save();
  ASSERT_TRUE(msr_indices) << msr_indices.error().describe();

  // Recognisable state in every part.
  auto regs = source->get_regs();
  ASSERT_TRUE(regs);
  regs->rax = 0x1122334455667788;
  regs->r15 = 0xdeadbeefcafef00d;
  regs->rip = 0x1000;
  regs->rflags = 0x202;
  ASSERT_TRUE(source->set_regs(*regs));
  auto sregs = source->get_sregs();
  ASSERT_TRUE(sregs);
  sregs->cs.base = 0;
  sregs->cs.selector = 0;
  sregs->ds.base = 0x12340;
  sregs->ds.selector = 0x1234;
  ASSERT_TRUE(source->set_sregs(*sregs));
  auto fpu = source->get_fpu();
  ASSERT_TRUE(fpu);
  fpu->xmm[1][0] = 0xab;
  ASSERT_TRUE(source->set_fpu(*fpu));
  const std::vector<MsrEntry> msrs = {{msr::kLstar, 0xffffffff81234560},
                                      {msr::kStar, 0x0023001000000000},
                                      {msr::kKernelGsBase, 0xffff888000001000},
                                      {msr::kSysenterEsp, 0x8000}};
  auto set = source->set_msrs(msrs);
  ASSERT_TRUE(set) << set.error().describe();
  auto debugregs = source->get_debugregs();
  ASSERT_TRUE(debugregs);
  debugregs->db[0] = 0x1000;
  debugregs->dr7 = 0x401;
  ASSERT_TRUE(source->set_debugregs(*debugregs));

  auto saved = source->save(*msr_indices);
  ASSERT_TRUE(saved) << saved.error().describe();
  EXPECT_EQ(saved->id, 0u);
  EXPECT_EQ(saved->regs.rax, 0x1122334455667788u);
  EXPECT_EQ(saved->msrs.size(), msr_indices->size());
  EXPECT_FALSE(saved->cpuid.empty());
  EXPECT_GT(saved->tsc_khz, 0u);

  auto target = target_vm->create_vcpu(0);
  ASSERT_TRUE(target) << target.error().describe();
  auto restored = target->restore(*saved);
  ASSERT_TRUE(restored) << restored.error().describe();
  auto copy = target->save(*msr_indices);
  ASSERT_TRUE(copy) << copy.error().describe();

  EXPECT_TRUE(same_bytes(copy->regs, saved->regs));
  EXPECT_TRUE(same_bytes(copy->sregs, saved->sregs));
  EXPECT_TRUE(same_bytes(copy->xsave, saved->xsave));
  EXPECT_EQ(copy->fpu.xmm[1][0], 0xab);
  EXPECT_TRUE(same_bytes(copy->xcrs, saved->xcrs));
  EXPECT_TRUE(same_bytes(copy->lapic, saved->lapic));
  EXPECT_TRUE(same_bytes(copy->mp_state, saved->mp_state));
  EXPECT_TRUE(same_bytes(copy->events, saved->events));
  EXPECT_TRUE(same_bytes(copy->debugregs, saved->debugregs));
  EXPECT_EQ(copy->tsc_khz, saved->tsc_khz);
  ASSERT_EQ(copy->cpuid.size(), saved->cpuid.size());
  for (size_t i = 0; i < copy->cpuid.size(); ++i) {
    EXPECT_TRUE(same_bytes(copy->cpuid[i], saved->cpuid[i])) << "leaf " << std::hex
                                                             << saved->cpuid[i].function;
  }
  ASSERT_EQ(copy->msrs.size(), saved->msrs.size());
  for (size_t i = 0; i < copy->msrs.size(); ++i) {
    const MsrEntry& before = saved->msrs[i];
    const MsrEntry& after = copy->msrs[i];
    EXPECT_EQ(after.index, before.index);
    if (before.index == msr::kTsc) {
      EXPECT_GE(after.data, before.data);  // it kept counting
      EXPECT_LT(after.data - before.data, saved->tsc_khz * 1000 * 10) << "TSC jumped";
    } else {
      EXPECT_EQ(after.data, before.data) << "MSR " << std::hex << before.index;
    }
  }
  for (const MsrEntry& expected : msrs) {
    EXPECT_NE(std::ranges::find(copy->msrs, expected), copy->msrs.end())
        << "MSR " << std::hex << expected.index;
  }
}

// After a kexec the host's TSC rate differs. Where KVM cannot run the saved
// rate (no TSC scaling, a slower rate) the vCPU keeps this host's, and the
// TSC the restore sets, moved on by the time the guest was frozen, must
// still be the TSC the guest reads: the kexec lab once saw the guest's TSC
// carry on from the save instead, as if no time had passed.
TEST_F(VcpuTest, RestoreAtARateKvmRefusesStillSetsTheTsc) {
  auto source_vm = make_vm();
  auto target_vm = make_vm();
  ASSERT_TRUE(source_vm && target_vm);
  auto source = make_vcpu(*source_vm, 0);
  ASSERT_TRUE(source) << source.error().describe();
  auto msr_indices = system().msrs_to_save();
  ASSERT_TRUE(msr_indices);
  auto saved = source->save(*msr_indices);
  ASSERT_TRUE(saved) << saved.error().describe();
  const uint64_t host_khz = saved->tsc_khz;
  // 0.2% slower: outside KVM's 250 ppm tolerance.
  saved->tsc_khz = host_khz - host_khz / 500;
  const uint64_t moved_on = host_khz * 1000 * 60;  // a minute frozen
  uint64_t wanted = 0;
  for (auto& entry : saved->msrs)
    if (entry.index == msr::kTsc) wanted = entry.data += moved_on;
  ASSERT_NE(wanted, 0u);

  auto target = target_vm->create_vcpu(0);
  ASSERT_TRUE(target);
  Vcpu::TscRestore tsc;
  auto restored = target->restore(*saved, &tsc);
  ASSERT_TRUE(restored) << restored.error().describe();
  if (tsc.tsc_not_set)
    GTEST_SKIP() << "this host's KVM ignores both a TSC write and the TSC offset (a nested KVM that keeps the "
                    "guest's TSC at the host's): nothing to check here";
  auto copy = target->save(*msr_indices);
  ASSERT_TRUE(copy);
  for (const auto& entry : copy->msrs) {
    if (entry.index != msr::kTsc) continue;
    EXPECT_GE(entry.data, wanted) << "the TSC did not move on (kept host rate: " << tsc.kept_host_rate << ")";
    EXPECT_LT(entry.data - wanted, host_khz * 1000 * 10) << "TSC jumped";
  }
  if (tsc.kept_host_rate) {
    EXPECT_EQ(copy->tsc_khz, host_khz);
  }
}

// A transfer's new vmm presets each vCPU's CPUID before the pause; restore()
// then skips KVM_SET_CPUID2 when only the bits KVM keeps up to date differ.
// Either way the restored vCPU must end with exactly the saved CPUID.
TEST_F(VcpuTest, RestoreOntoAPresetCpuidEndsWithTheSavedCpuid) {
  auto source_vm = make_vm();
  ASSERT_TRUE(source_vm);
  auto source = make_vcpu(*source_vm, 0);
  ASSERT_TRUE(source) << source.error().describe();
  // Make the runtime bits move: CR4.OSXSAVE (CPUID.1:ECX.OSXSAVE) and XCR0
  // (the XSAVE area sizes of leaf 0xD).
  auto sregs = source->get_sregs();
  ASSERT_TRUE(sregs);
  sregs->cr4 |= 1u << 18;
  ASSERT_TRUE(source->set_sregs(*sregs)) << "CR4.OSXSAVE";
  auto xcrs = source->get_xcrs();
  ASSERT_TRUE(xcrs);
  xcrs->nr_xcrs = 1;
  xcrs->xcrs[0].xcr = 0;
  xcrs->xcrs[0].value = 0x7;  // x87 | SSE | AVX
  ASSERT_TRUE(source->set_xcrs(*xcrs));
  auto msr_indices = system().msrs_to_save();
  ASSERT_TRUE(msr_indices);
  auto saved = source->save(*msr_indices);
  ASSERT_TRUE(saved) << saved.error().describe();

  for (bool alter : {false, true}) {
    SCOPED_TRACE(alter ? "preset differs in a real feature bit" : "preset as the source had it");
    auto target_vm = make_vm();
    ASSERT_TRUE(target_vm);
    auto target = target_vm->create_vcpu(0);
    ASSERT_TRUE(target);
    std::vector<kvm_cpuid_entry2> preset = source->cpuid_set();
    ASSERT_FALSE(preset.empty());
    if (alter) {
      for (auto& entry : preset)
        if (entry.function == 1) entry.edx &= ~(1u << 23);  // MMX: not a runtime bit
    }
    ASSERT_TRUE(target->preset_cpuid(preset));
    auto restored = target->restore(*saved);
    ASSERT_TRUE(restored) << restored.error().describe();
    auto effective = target->get_cpuid();
    ASSERT_TRUE(effective);
    ASSERT_EQ(effective->size(), saved->cpuid.size());
    for (size_t i = 0; i < effective->size(); ++i)
      EXPECT_TRUE(same_bytes((*effective)[i], saved->cpuid[i])) << "leaf " << std::hex << saved->cpuid[i].function
                                                                << "." << saved->cpuid[i].index;
  }
}

TEST(CpuidCompare, IgnoresOnlyTheBitsKvmKeepsUpToDate) {
  kvm_cpuid_entry2 leaf1{};
  leaf1.function = 1;
  leaf1.ecx = 1u << 27;
  kvm_cpuid_entry2 other = leaf1;
  other.ecx = 0;  // OSXSAVE differs: runtime
  other.edx = 1u << 9;  // APIC differs: runtime
  EXPECT_TRUE(same_cpuid_but_runtime_bits(std::span(&leaf1, 1), std::span(&other, 1)));
  other.edx |= 1u << 23;  // MMX differs: real
  EXPECT_FALSE(same_cpuid_but_runtime_bits(std::span(&leaf1, 1), std::span(&other, 1)));
  EXPECT_FALSE(same_cpuid_but_runtime_bits(std::span(&leaf1, 1), {}));
}

TEST_F(VcpuTest, RestoreRefusesAnotherVcpusState) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto vcpu0 = make_vcpu(*vm, 0);
  auto vcpu1 = vm->create_vcpu(1);
  ASSERT_TRUE(vcpu0 && vcpu1);
  auto state = vcpu0->save({});
  ASSERT_TRUE(state) << state.error().describe();
  auto restored = vcpu1->restore(*state);
  ASSERT_FALSE(restored);
  EXPECT_EQ(restored.error().code, EINVAL);
}

TEST_F(VcpuTest, GetMsrsNamesTheMsrKvmCannotRead) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto vcpu = make_vcpu(*vm, 0);
  ASSERT_TRUE(vcpu) << vcpu.error().describe();
  const uint32_t indices[] = {msr::kLstar, 0xdeadbeef};
  auto msrs = vcpu->get_msrs(indices);
  ASSERT_FALSE(msrs);
  EXPECT_NE(msrs.error().message.find("0xdeadbeef"), std::string::npos) << msrs.error().message;
}

TEST_F(VcpuTest, MovedVcpuKeepsItsRunPage) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto vcpu = vm->create_vcpu(0);
  ASSERT_TRUE(vcpu) << vcpu.error().describe();
  Vcpu moved(std::move(*vcpu));
  EXPECT_FALSE(vcpu->fd().valid());  // NOLINT(bugprone-use-after-move)
  moved.set_immediate_exit(true);
  EXPECT_EQ(moved.run_data().immediate_exit, 1);
  Vcpu assigned = std::move(moved);
  EXPECT_EQ(assigned.run_data().immediate_exit, 1);
}

TEST_F(VcpuTest, ImmediateExitMakesRunReturnEintr) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto vcpu = vm->create_vcpu(0);
  ASSERT_TRUE(vcpu) << vcpu.error().describe();
  vcpu->set_immediate_exit(true);
  auto ran = vcpu->run();
  ASSERT_FALSE(ran);
  EXPECT_EQ(ran.error().code, EINTR);
}

void ignore_signal(int) {}

// The way the VMM stops a vCPU thread: immediate_exit from another thread,
// then a signal to knock it out of KVM_RUN.
TEST_F(VcpuTest, ImmediateExitFromAnotherThreadStopsASpinningGuest) {
  auto vm = make_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  constexpr size_t kMemorySize = 64 * 1024;
  void* memory = ::mmap(nullptr, kMemorySize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(memory, MAP_FAILED);
  static constexpr uint8_t kSpin[] = {0xeb, 0xfe};  // jmp $
  std::memcpy(static_cast<uint8_t*>(memory) + 0x1000, kSpin, sizeof(kSpin));
  ASSERT_TRUE(vm->set_memory_slot({.slot = 0, .guest_phys_addr = 0, .size = kMemorySize,
                                   .host_address = memory}));
  auto vcpu = vm->create_vcpu(0);
  ASSERT_TRUE(vcpu) << vcpu.error().describe();
  auto sregs = vcpu->get_sregs();
  ASSERT_TRUE(sregs);
  sregs->cs.base = 0;
  sregs->cs.selector = 0;
  ASSERT_TRUE(vcpu->set_sregs(*sregs));
  kvm_regs regs{};
  regs.rip = 0x1000;
  regs.rflags = 0x2;
  ASSERT_TRUE(vcpu->set_regs(regs));

  struct sigaction action{};
  struct sigaction previous{};
  action.sa_handler = ignore_signal;  // no SA_RESTART: KVM_RUN returns EINTR
  ASSERT_EQ(::sigaction(SIGUSR1, &action, &previous), 0);

  std::atomic<bool> started = false;
  std::atomic<bool> finished = false;
  Result<void> outcome;
  std::thread runner([&] {
    started = true;
    outcome = vcpu->run();
    finished = true;
  });
  while (!started) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let it enter the guest
  vcpu->set_immediate_exit(true);
  // A signal sent before KVM_RUN starts is lost, but immediate_exit then makes
  // KVM_RUN return at once; keep knocking until the thread is out.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!finished && std::chrono::steady_clock::now() < deadline) {
    ::pthread_kill(runner.native_handle(), SIGUSR1);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  runner.join();
  ::sigaction(SIGUSR1, &previous, nullptr);
  ASSERT_FALSE(outcome);
  EXPECT_EQ(outcome.error().code, EINTR);
  ::munmap(memory, kMemorySize);
}

}  // namespace
}  // namespace vmm::kvm

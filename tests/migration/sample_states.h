// Saved states the migration tests share: random ones that set every field,
// the smallest valid one, and the one the checked-in 1.0 blob was made from.
#pragma once

#include <random>

#include "migration/saved_state.h"

namespace vmm::migration {

template <class T>
inline void fill_random(T& value, std::mt19937_64& rng) {
  static_assert(std::is_trivially_copyable_v<T>);
  auto* bytes = reinterpret_cast<uint8_t*>(&value);
  for (size_t i = 0; i < sizeof(T); ++i) bytes[i] = static_cast<uint8_t>(rng());
}

inline kvm::VcpuState random_vcpu(uint32_t id, size_t msr_count, size_t cpuid_count,
                           std::mt19937_64& rng) {
  kvm::VcpuState vcpu;
  vcpu.id = id;
  fill_random(vcpu.regs, rng);
  fill_random(vcpu.sregs, rng);
  fill_random(vcpu.fpu, rng);
  fill_random(vcpu.xsave, rng);
  fill_random(vcpu.xcrs, rng);
  for (size_t i = 0; i < msr_count; ++i)
    vcpu.msrs.push_back({static_cast<uint32_t>(rng()), rng()});
  fill_random(vcpu.lapic, rng);
  fill_random(vcpu.mp_state, rng);
  fill_random(vcpu.events, rng);
  fill_random(vcpu.debugregs, rng);
  vcpu.cpuid.resize(cpuid_count);
  for (kvm_cpuid_entry2& entry : vcpu.cpuid) fill_random(entry, rng);
  vcpu.tsc_khz = rng();
  return vcpu;
}

// Every field set, random bytes in every kernel struct, 3 vCPUs with sparse
// ids, 3 regions (split RAM on guest_memfd plus the shared memfd region).
inline SavedState full_state(uint64_t seed = 1) {
  std::mt19937_64 rng(seed);
  SavedState state;
  state.metadata = {.vm_name = "demo-vm",
                    .generation = 7,
                    .program_version = "0.1.0-test",
                    .saved_at_realtime_ns = 1'700'000'000'123'456'789,
                    .was_running = true,
                    .guest_tsc_at_save = rng(),
                    .host_monotonic_ns_at_save = rng(),
                    .vm_luo_token = 0x1234};
  fill_random(state.vm.pic_master, rng);
  fill_random(state.vm.pic_slave, rng);
  fill_random(state.vm.ioapic, rng);
  fill_random(state.vm.pit, rng);
  fill_random(state.vm.clock, rng);
  state.vcpus.push_back(random_vcpu(0, 12, 9, rng));
  state.vcpus.push_back(random_vcpu(2, 5, 9, rng));
  state.vcpus.push_back(random_vcpu(31, 1, 3, rng));
  state.memory = {
      {{"ram0", memory::RegionRole::ram, memory::Backing::guest_memfd, 0, 0xC000'0000, 0},
       101, 100, SlotKind::guest_memfd},
      {{"ram1", memory::RegionRole::ram, memory::Backing::guest_memfd, 0x1'0000'0000,
        0x4000'0000, 1},
       102, 100, SlotKind::guest_memfd},
      {{"shared", memory::RegionRole::shared, memory::Backing::memfd, 0xD000'0000, 16 << 20, 2},
       103, 0, SlotKind::userspace},
  };
  state.uart = {.ier = 0x0f, .iir = 0xc1, .lcr = 0x03, .mcr = 0x0b, .lsr = 0x61, .msr = 0xb0,
                .scr = 0x5a, .dll = 0x01, .dlm = 0x00, .fcr = 0xc7,
                .pending_input = {'l', 's', '\n', 0, 0xff}, .irq_level = true,
                .thr_interrupt_pending = true};
  state.test_device = {.last_verify_request = 4,
                       .last_result = {.pages_checked = 1'048'576, .mismatches = 0},
                       .heartbeat_at_save = 98'765};
  return state;
}

// The smallest valid state: one vCPU, one RAM region, nothing optional.
inline SavedState small_state() {
  SavedState state;
  state.metadata.vm_name = "small";
  state.vcpus.push_back({});
  state.memory.push_back(
      {{"ram0", memory::RegionRole::ram, memory::Backing::memfd, 0, 1 << 20, 0}, 1, 0,
       SlotKind::userspace});
  return state;
}

// The state tests/migration/data/state-1.0.bin was encoded from, by the 1.0
// encoder (commit c41e378, before the schema tables). mt19937_64 is fully
// specified, so every build makes the same bytes. Do not change it: the
// golden blob would no longer match.
inline SavedState golden_state() {
  std::mt19937_64 rng(20261202);
  SavedState state;
  state.metadata = {.vm_name = "golden-1.0", .generation = 3, .program_version = "0.1.0",
                    .saved_at_realtime_ns = 1'764'633'600'000'000'000, .was_running = true,
                    .guest_tsc_at_save = 0x1122334455667788, .host_monotonic_ns_at_save = 987'654'321,
                    .vm_luo_token = 0x51};
  fill_random(state.vm.pic_master, rng);
  fill_random(state.vm.pic_slave, rng);
  fill_random(state.vm.ioapic, rng);
  fill_random(state.vm.pit, rng);
  fill_random(state.vm.clock, rng);
  kvm::VcpuState vcpu;
  vcpu.id = 0;
  fill_random(vcpu.regs, rng);
  fill_random(vcpu.sregs, rng);
  fill_random(vcpu.fpu, rng);
  fill_random(vcpu.xsave, rng);
  fill_random(vcpu.xcrs, rng);
  for (uint32_t index : {0x10u, 0x174u, 0xc0000082u, 0x4b564d01u}) vcpu.msrs.push_back({index, rng()});
  fill_random(vcpu.lapic, rng);
  fill_random(vcpu.mp_state, rng);
  fill_random(vcpu.events, rng);
  fill_random(vcpu.debugregs, rng);
  vcpu.cpuid.resize(2);
  for (kvm_cpuid_entry2& entry : vcpu.cpuid) fill_random(entry, rng);
  vcpu.tsc_khz = 2'000'000;
  state.vcpus.push_back(vcpu);
  state.memory = {
      {{"ram0", memory::RegionRole::ram, memory::Backing::guest_memfd, 0, 256 << 20, 0}, 0x52, 0x51,
       SlotKind::guest_memfd},
      {{"shared", memory::RegionRole::shared, memory::Backing::memfd, 0xD000'0000, 16 << 20, 1}, 0x53, 0,
       SlotKind::userspace},
  };
  state.uart.ier = 0x03; state.uart.iir = 0x01; state.uart.lcr = 0x03; state.uart.mcr = 0x0b;
  state.uart.lsr = 0x60; state.uart.msr = 0x00; state.uart.scr = 0x5a; state.uart.dll = 0x01;
  state.uart.dlm = 0x00; state.uart.fcr = 0x07; state.uart.pending_input = {'o', 'k', '\n'};
  state.uart.irq_level = false;
  state.test_device = {.last_verify_request = 2, .last_result = {.pages_checked = 65536, .mismatches = 0},
                       .heartbeat_at_save = 4242};
  return state;
}
}  // namespace vmm::migration

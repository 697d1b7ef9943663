// Fuzzes migration::decode, the saved-state blob a new vmm reads after a live
// update. The corpus is real SavedState values encoded (as tests/migration
// builds them). Every input is decoded as it is, and a second time with its
// header's payload size and CRC32C made to match the mutated payload, so the
// mutations reach the FDT and property checks behind the checksum.
//
// Invariant beyond the sanitizers: whatever decode() accepts encodes again,
// and that blob decodes to an equal state.
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "migration/state_blob.h"
#include "tests/fuzz/fuzz_driver.h"

namespace vmm::fuzz {
namespace {

using migration::SavedState;

template <class T>
void fill_random(T& value, std::mt19937_64& rng) {
  static_assert(std::is_trivially_copyable_v<T>);
  auto* bytes = reinterpret_cast<uint8_t*>(&value);
  for (size_t i = 0; i < sizeof(T); ++i) bytes[i] = static_cast<uint8_t>(rng());
}

kvm::VcpuState random_vcpu(uint32_t id, size_t msrs, size_t cpuid_entries, std::mt19937_64& rng) {
  kvm::VcpuState vcpu;
  vcpu.id = id;
  fill_random(vcpu.regs, rng);
  fill_random(vcpu.sregs, rng);
  fill_random(vcpu.fpu, rng);
  fill_random(vcpu.xsave, rng);
  fill_random(vcpu.xcrs, rng);
  for (size_t i = 0; i < msrs; ++i) vcpu.msrs.push_back({static_cast<uint32_t>(rng()), rng()});
  fill_random(vcpu.lapic, rng);
  fill_random(vcpu.mp_state, rng);
  fill_random(vcpu.events, rng);
  fill_random(vcpu.debugregs, rng);
  vcpu.cpuid.resize(cpuid_entries);
  for (kvm_cpuid_entry2& entry : vcpu.cpuid) fill_random(entry, rng);
  vcpu.tsc_khz = rng();
  return vcpu;
}

SavedState full_state(uint64_t seed) {
  std::mt19937_64 rng(seed);
  SavedState state;
  state.metadata = {.vm_name = "fuzz-vm",
                    .generation = seed,
                    .program_version = "0.1.0-fuzz",
                    .saved_at_realtime_ns = 1'700'000'000'123'456'789,
                    .was_running = (seed & 1) != 0,
                    .guest_tsc_at_save = rng(),
                    .host_monotonic_ns_at_save = rng(),
                    .vm_luo_token = 0x1234};
  fill_random(state.vm.pic_master, rng);
  fill_random(state.vm.pic_slave, rng);
  fill_random(state.vm.ioapic, rng);
  fill_random(state.vm.pit, rng);
  fill_random(state.vm.clock, rng);
  state.vcpus.push_back(random_vcpu(0, 12, 9, rng));
  if (seed > 1) state.vcpus.push_back(random_vcpu(2, 5, 9, rng));
  state.memory = {
      {{"ram0", memory::RegionRole::ram, memory::Backing::guest_memfd, 0, 0xC000'0000, 0}, 101, 100,
       migration::SlotKind::guest_memfd},
      {{"shared", memory::RegionRole::shared, memory::Backing::memfd, 0xD000'0000, 16 << 20, 1}, 103, 0,
       migration::SlotKind::userspace},
  };
  state.uart = {.ier = 0x0f, .iir = 0xc1, .lcr = 0x03, .mcr = 0x0b, .lsr = 0x61, .msr = 0xb0, .scr = 0x5a,
                .dll = 0x01, .dlm = 0x00, .fcr = 0xc7, .pending_input = {'l', 's', '\n', 0, 0xff},
                .irq_level = true};
  state.test_device = {.last_verify_request = 4,
                       .last_result = {.pages_checked = 1'048'576, .mismatches = 0},
                       .heartbeat_at_save = 98'765};
  return state;
}

SavedState small_state() {
  SavedState state;
  state.metadata.vm_name = "small";
  state.vcpus.push_back({});
  state.memory.push_back({{"ram0", memory::RegionRole::ram, memory::Backing::memfd, 0, 1 << 20, 0}, 1, 0,
                          migration::SlotKind::userspace});
  return state;
}

void decode_and_check(std::span<const uint8_t> blob) {
  auto decoded = migration::decode(blob);
  if (!decoded) {
    if (decoded.error().message.empty()) fail("decode failed without saying why");
    return;
  }
  auto again = migration::encode(*decoded);
  if (!again) fail("a state decode() accepted does not encode: " + again.error().describe());
  auto round_trip = migration::decode(*again);
  if (!round_trip) fail("a re-encoded state does not decode: " + round_trip.error().describe());
  if (!(*round_trip == *decoded)) fail("a re-encoded state decodes to a different state");
}

void fuzz_one(std::span<const uint8_t> input) {
  decode_and_check(input);
  // The same bytes behind a header that matches them.
  if (input.size() < migration::kHeaderSize) return;
  std::vector<uint8_t> resealed(input.begin(), input.end());
  uint32_t header_size = 0;
  std::memcpy(&header_size, resealed.data() + 12, sizeof header_size);
  if (header_size < migration::kHeaderSize || header_size > resealed.size()) header_size = migration::kHeaderSize;
  std::memcpy(resealed.data() + 12, &header_size, sizeof header_size);
  const uint64_t payload_size = resealed.size() - header_size;
  std::memcpy(resealed.data() + 16, &payload_size, sizeof payload_size);
  const uint32_t crc = migration::crc32c(std::span<const uint8_t>(resealed).subspan(header_size));
  std::memcpy(resealed.data() + 24, &crc, sizeof crc);
  decode_and_check(resealed);
}

std::vector<Bytes> corpus() {
  std::vector<Bytes> out;
  for (const SavedState& state : {small_state(), full_state(1), full_state(2)}) {
    auto blob = migration::encode(state);
    if (!blob) fail("cannot encode a corpus state: " + blob.error().describe());
    out.push_back(std::move(*blob));
  }
  return out;
}

std::vector<Bytes> dictionary() {
  std::vector<Bytes> out;
  for (const char* token : {"VMMSTATE", "ram0", "shared", "vcpu", "msrs", "cpuid", "regions", "\xd0\x0d\xfe\xed"})
    out.push_back(to_bytes(token));
  return out;
}

}  // namespace
}  // namespace vmm::fuzz

int main(int argc, char** argv) {
  using namespace vmm::fuzz;
  Target target;
  target.name = "state_blob_fuzz";
  target.fuzz_one = fuzz_one;
  target.corpus = corpus();
  target.dictionary = dictionary();
  target.default_iterations = 100'000;
  target.default_time_cap = std::chrono::seconds(60);
  return run(target, argc, argv);
}

// Fuzzes decode_registry (update/luo_registry.h): the registry a new kernel's
// LUO agent reads from the previous kernel's, whatever wrote it.
//
// Each input is tried as it is and with its checksum resealed (so mutations
// reach the JSON payload, not only the CRC check). Invariants beyond the
// sanitizers: nothing throws; a refusal says that nothing is restored; a
// registry decode accepts encodes to bytes that decode to the same entries.
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "migration/state_blob.h"
#include "tests/fuzz/fuzz_driver.h"
#include "update/luo_registry.h"

namespace vmm::fuzz {
namespace {

void check(std::span<const uint8_t> input) {
  auto registry = decode_registry(input);
  if (!registry) {
    if (registry.error().message.find("no VM is restored from it") == std::string::npos)
      fail("a refusal that does not say nothing is restored: " + registry.error().message);
    return;
  }
  if (registry->major != kRegistryMajor) fail("accepted another major version");
  const std::vector<uint8_t> written = encode_registry(*registry);
  auto again = decode_registry(written);
  if (!again) fail("decode refuses what encode wrote: " + again.error().describe());
  if (again->entries != registry->entries) fail("a registry's entries change across encode/decode");
}

void fuzz_one(std::span<const uint8_t> input) {
  check(input);
  if (input.size() < kRegistryHeaderSize) return;
  uint32_t header_size;
  std::memcpy(&header_size, input.data() + 12, sizeof header_size);
  if (header_size < kRegistryHeaderSize || header_size > input.size()) return;
  std::vector<uint8_t> resealed(input.begin(), input.end());
  uint64_t payload_size;
  std::memcpy(&payload_size, resealed.data() + 16, sizeof payload_size);
  const size_t available = resealed.size() - header_size;
  const size_t size = payload_size < available ? static_cast<size_t>(payload_size) : available;
  const uint32_t crc = migration::crc32c(std::span<const uint8_t>(resealed).subspan(header_size, size));
  std::memcpy(resealed.data() + 24, &crc, sizeof crc);
  check(resealed);
}

}  // namespace
}  // namespace vmm::fuzz

int main(int argc, char** argv) {
  using namespace vmm::fuzz;
  Target target;
  target.name = "luo_registry_fuzz";
  target.fuzz_one = fuzz_one;
  vmm::Registry registry;
  registry.agent_pid = 7;
  registry.sealed_at_ns = 1'800'000'000'000'000'000;
  registry.entries = {{"vm-a", {"--control-socket", "/run/vmm/vm-a.sock", "--console", "none"}},
                      {"vm-b", {}},
                      {"vm.c_d-e", {"--log-level", "debug"}}};
  target.corpus.push_back(vmm::encode_registry(registry));
  target.corpus.push_back(vmm::encode_registry(vmm::Registry{}));
  target.dictionary = {to_bytes("VMMLUORG"), to_bytes("\"sessions\""), to_bytes("\"name\""),
                       to_bytes("\"restore_args\""), to_bytes("\"--session\""), to_bytes("\"--luo-agent\""),
                       to_bytes("\"sealed_at_ns\""), to_bytes("\"agent_pid\""), to_bytes("\\u0000")};
  return run(target, argc, argv);
}

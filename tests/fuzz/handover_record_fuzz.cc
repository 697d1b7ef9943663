// Fuzzes decode_handover and rollback_fd_of (update/handover_record.h): the
// record a new vmm reads from the previous one, whatever version wrote it.
//
// Each input is tried as it is and with its checksum resealed (so mutations
// reach the body, not only the CRC check). Invariant beyond the sanitizers:
// a record decode accepts encodes to bytes that decode to the same encoding.
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "migration/state_blob.h"
#include "tests/fuzz/fuzz_driver.h"
#include "update/handover_record.h"

namespace vmm::fuzz {
namespace {

void check(std::span<const uint8_t> input) {
  [[maybe_unused]] auto rollback = rollback_fd_of(input);
  auto record = decode_handover(input);
  if (!record) return;
  const std::vector<uint8_t> written = encode(*record);
  auto again = decode_handover(written);
  if (!again) fail("decode refuses what encode wrote: " + again.error().describe());
  if (encode(*again) != written) fail("a handover record changes across encode/decode");
}

void fuzz_one(std::span<const uint8_t> input) {
  check(input);
  if (input.size() < kHandoverHeaderSize) return;
  uint32_t header_size;
  std::memcpy(&header_size, input.data() + 12, sizeof header_size);
  if (header_size < kHandoverHeaderSize || header_size > input.size()) return;
  std::vector<uint8_t> resealed(input.begin(), input.end());
  const uint32_t crc = migration::crc32c(std::span<const uint8_t>(resealed).subspan(header_size));
  std::memcpy(resealed.data() + 24, &crc, sizeof crc);
  check(resealed);
}

}  // namespace
}  // namespace vmm::fuzz

int main(int argc, char** argv) {
  using namespace vmm::fuzz;
  Target target;
  target.name = "handover_record_fuzz";
  target.fuzz_one = fuzz_one;
  vmm::HandoverRecord exec;
  exec.mode = "exec";
  exec.session = "vm-1";
  exec.fds = {7, 8, 9, 10};
  exec.luo_manifest = 1;
  exec.listening_socket = 2;
  exec.connection = 3;
  exec.reply_id = "a";
  exec.record.status = "in-progress";
  exec.record.mode = "exec";
  exec.record.generation = 2;
  exec.record.add_phase("prepare", std::chrono::microseconds(900));
  vmm::HandoverRecord transfer;
  transfer.mode = "transfer";
  transfer.state_bytes = 48'000;
  transfer.listening_socket = 0;
  transfer.reply_id = nlohmann::json{{"nested", {1, 2, 3}}};
  vmm::HandoverRecord kexec;
  kexec.mode = "kexec";
  kexec.previous_failure = "live update failed during restore: checksum";
  for (const auto& record : {exec, transfer, kexec}) target.corpus.push_back(vmm::encode(record));
  target.dictionary = {to_bytes("\"mode\""), to_bytes("\"exec\""), to_bytes("\"transfer\""), to_bytes("\"kexec\""),
                       to_bytes("\"luo_manifest\""), to_bytes("\"connection\""), to_bytes("\"listening_socket\""),
                       to_bytes("\"state_bytes\""), to_bytes("\"record\""), to_bytes("\"x-inject\""),
                       to_bytes("18446744073709551615"), to_bytes("null"), to_bytes("VMMHANDO")};
  target.text = false;
  target.default_iterations = 100'000;
  target.default_time_cap = std::chrono::seconds(60);
  return run(target, argc, argv);
}

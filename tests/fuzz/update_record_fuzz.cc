// Fuzzes UpdateRecord::from_json, which reads the update record a previous
// vmm handed over inside the handover record (update/record.h).
//
// Each input is parsed as JSON (unparsable inputs stop there) and given to
// from_json. Invariant beyond the sanitizers: a record from_json accepts
// survives to_json -> from_json unchanged.
#include <nlohmann/json.hpp>

#include <span>
#include <string>

#include "tests/fuzz/fuzz_driver.h"
#include "update/record.h"

namespace vmm::fuzz {
namespace {

using nlohmann::json;

void fuzz_one(std::span<const uint8_t> input) {
  json parsed = json::parse(input.begin(), input.end(), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return;
  auto record = UpdateRecord::from_json(parsed);
  if (!record) return;
  const json written = record->to_json();
  auto again = UpdateRecord::from_json(written);
  if (!again) fail("from_json refuses what to_json wrote: " + again.error().describe() + ": " + written.dump());
  if (again->to_json() != written) fail("an update record changes across to_json/from_json: " + written.dump());
}

}  // namespace
}  // namespace vmm::fuzz

int main(int argc, char** argv) {
  using namespace vmm::fuzz;
  Target target;
  target.name = "update_record_fuzz";
  target.fuzz_one = fuzz_one;
  vmm::UpdateRecord completed;
  completed.status = "completed";
  completed.mode = "transfer";
  completed.generation = 3;
  completed.add_phase("prepare", std::chrono::microseconds(1200));
  completed.add_phase("freeze", std::chrono::microseconds(35));
  completed.blackout_us = 840;
  vmm::UpdateRecord failed;
  failed.status = "failed";
  failed.mode = "exec";
  failed.error = "cannot exec /nonexistent: No such file or directory";
  for (const vmm::UpdateRecord& record : {vmm::UpdateRecord{}, completed, failed})
    target.corpus.push_back(to_bytes(record.to_json().dump()));
  target.corpus.push_back(to_bytes(R"({"status": "none", "generation": 0, "phases": []})"));
  target.dictionary = {to_bytes("\"status\""), to_bytes("\"mode\""), to_bytes("\"generation\""),
                       to_bytes("\"phases\""), to_bytes("\"duration_us\""), to_bytes("\"blackout_us\""),
                       to_bytes("\"error\""), to_bytes("\"name\""), to_bytes("\"handover_started_ns\""),
                       to_bytes("-1"), to_bytes("18446744073709551615"), to_bytes("null")};
  target.text = true;
  target.default_iterations = 100'000;
  target.default_time_cap = std::chrono::seconds(60);
  return run(target, argc, argv);
}

#include "update/record.h"

#include <time.h>

namespace vmm {
namespace {

using nlohmann::json;

int64_t clock_ns(clockid_t clock) {
  timespec now{};
  clock_gettime(clock, &now);
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

// Reads an optional field of the given type; a field of another type is an error.
template <typename T>
Result<std::optional<T>> optional_field(const json& in, const char* key) {
  if (!in.contains(key) || in[key].is_null()) return std::optional<T>{};
  try {
    return std::optional<T>(in[key].get<T>());
  } catch (const json::exception&) {
    return fail(std::string("the update record's field '") + key + "' has the wrong type", EPROTO);
  }
}

}  // namespace

int64_t monotonic_ns() { return clock_ns(CLOCK_MONOTONIC); }
int64_t realtime_ns() { return clock_ns(CLOCK_REALTIME); }

json UpdateRecord::to_json() const {
  json phases_json = json::array();
  for (const auto& phase : phases) phases_json.push_back({{"name", phase.name}, {"duration_us", phase.duration_us}});
  json out = {{"status", status}, {"generation", generation}, {"phases", phases_json}};
  if (!mode.empty()) out["mode"] = mode;
  if (blackout_us) out["blackout_us"] = *blackout_us;
  if (guest_gap_us) out["guest_gap_us"] = *guest_gap_us;
  if (guest_gap_reason) out["guest_gap_reason"] = *guest_gap_reason;
  if (error) out["error"] = *error;
  if (failed_phase) out["failed_phase"] = *failed_phase;
  if (tsc_khz) {
    out["tsc"] = {{"saved_khz", tsc_saved_khz.value_or(0)}, {"host_khz", tsc_host_khz.value_or(0)}, {"khz", *tsc_khz}};
    if (tsc_note) out["tsc"]["note"] = *tsc_note;
  }
  if (pid) out["pid"] = *pid;
  if (frames_sampled) out["frames"] = {{"sampled", *frames_sampled}, {"same", frames_same.value_or(0)}};
  if (brownout_status) out["brownout_status"] = *brownout_status;
  if (brownout_us) out["brownout_us"] = *brownout_us;
  if (baseline_pass_us) out["baseline_pass_us"] = *baseline_pass_us;
  if (brownout_reason) out["brownout_reason"] = *brownout_reason;
  return out;
}

json UpdateRecord::to_carried_json() const {
  json carried = to_json();
  carried["blackout_started_ns"] = blackout_started_ns;
  carried["handover_started_ns"] = handover_started_ns;
  json frames = json::array();
  for (const auto& frame : frames_at_prepare) frames.push_back({frame.region, frame.offset, frame.pfn});
  carried["frames_at_prepare"] = frames;
  return carried;
}

Result<UpdateRecord> UpdateRecord::from_json(const json& in) {
  if (!in.is_object()) return fail("the update record is not a JSON object", EPROTO);
  UpdateRecord record;
  VMM_TRY_ASSIGN(status, optional_field<std::string>(in, "status"));
  VMM_TRY_ASSIGN(mode, optional_field<std::string>(in, "mode"));
  VMM_TRY_ASSIGN(generation, optional_field<uint64_t>(in, "generation"));
  if (!status || !generation) return fail("the update record lacks 'status' or 'generation'", EPROTO);
  record.status = *status;
  record.mode = mode.value_or("");
  record.generation = *generation;
  if (in.contains("phases")) {
    if (!in["phases"].is_array()) return fail("the update record's 'phases' is not an array", EPROTO);
    for (const auto& phase : in["phases"]) {
      VMM_TRY_ASSIGN(name, optional_field<std::string>(phase, "name"));
      VMM_TRY_ASSIGN(duration, optional_field<int64_t>(phase, "duration_us"));
      if (!phase.is_object() || !name || !duration) return fail("the update record has a malformed phase", EPROTO);
      record.phases.push_back({*name, *duration});
    }
  }
  VMM_TRY_ASSIGN(blackout, optional_field<int64_t>(in, "blackout_us"));
  VMM_TRY_ASSIGN(error, optional_field<std::string>(in, "error"));
  VMM_TRY_ASSIGN(failed_phase, optional_field<std::string>(in, "failed_phase"));
  VMM_TRY_ASSIGN(blackout_started, optional_field<int64_t>(in, "blackout_started_ns"));
  VMM_TRY_ASSIGN(handover_started, optional_field<int64_t>(in, "handover_started_ns"));
  record.blackout_us = blackout;
  record.error = error;
  record.failed_phase = failed_phase;
  record.blackout_started_ns = blackout_started.value_or(0);
  if (in.contains("frames_at_prepare")) {
    const json& frames = in["frames_at_prepare"];
    bool valid = frames.is_array() && frames.size() <= 4096;
    for (size_t i = 0; valid && i < frames.size(); ++i) {
      const json& frame = frames[i];
      valid = frame.is_array() && frame.size() == 3 && frame[0].is_number_unsigned() &&
              frame[1].is_number_unsigned() && frame[2].is_number_unsigned() && frame[0].get<uint64_t>() <= UINT32_MAX;
      if (valid)
        record.frames_at_prepare.push_back(
            {frame[0].get<uint32_t>(), frame[1].get<uint64_t>(), frame[2].get<uint64_t>()});
    }
    if (!valid) return fail("the update record's 'frames_at_prepare' is malformed", EPROTO);
  }
  record.handover_started_ns = handover_started.value_or(0);
  return record;
}

void UpdateRecord::add_phase(std::string name, std::chrono::nanoseconds duration) {
  phases.push_back({std::move(name), std::chrono::duration_cast<std::chrono::microseconds>(duration).count()});
}

}  // namespace vmm

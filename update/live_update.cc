#include "update/live_update.h"

#include <algorithm>
#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "migration/state_blob.h"
#include "update/frames.h"
#include "update/kexec_support.h"
#include "update/versions.h"
#include "vmm/control/server.h"

namespace vmm {
namespace {

using nlohmann::json;
using namespace std::chrono;

constexpr uint32_t kMsrTsc = 0x10;

std::unexpected<control::CommandError> command_error(std::string desc) {
  return std::unexpected(control::CommandError{control::kGenericError, std::move(desc)});
}

}  // namespace

std::string own_binary() {
  std::error_code error;
  std::string path = std::filesystem::read_symlink("/proc/self/exe", error).string();
  if (error) return {};
  // After a package upgrade replaced the file, the link reads "PATH (deleted)":
  // PATH then holds the new binary, which is what an update should run.
  constexpr std::string_view kDeleted = " (deleted)";
  if (path.ends_with(kDeleted)) path.resize(path.size() - kDeleted.size());
  return path;
}

LiveUpdate::LiveUpdate(Machine& machine, LaunchOptions launch, UpdateRecord last)
    : machine_(machine),
      launch_(std::move(launch)),
      record_(std::move(last)),
      watch_(machine, [this](const GuestWatch::Findings& found) { publish_watch(found); }) {}

LiveUpdate::~LiveUpdate() { watch_.stop(); }

json LiveUpdate::query() const {
  json out;
  {
    std::lock_guard lock(record_mutex_);
    out = record_.to_json();
  }
  // A coordinated update waiting for its coordinator says where.
  if (const auto stop = gate_.waiting(); stop != UpdateGate::Stop::none) out["waiting"] = to_string(stop);
  return out;
}

json LiveUpdate::kexec_capability() const {
  auto support = kexec_support(launch_.kvm_device, seconds(1), &cancelled_);
  if (!support) return {{"error", support.error().describe()}};
  json out = support->to_json();
  if (auto ready = check_kexec_support(*support, machine_); ready) {
    out["this_vm"] = "ready";
  } else {
    out["this_vm"] = "refused";
    out["refusal"] = ready.error().describe();
  }
  return out;
}

void LiveUpdate::cancel() { cancelled_ = true; }

Result<UpdateRequest> LiveUpdate::parse(const json& arguments) const {
  UpdateRequest request;
  std::vector<std::string> known{"mode", "binary", "kernel", "initrd", "cmdline", "prefault", "coordinated"};
  // Test hooks exist only in a build made for tests: anywhere else these are
  // unknown parameters like any other.
  if (fault_injection_built()) known.insert(known.end(), {"x-inject", "x-commit-timeout-ms"});
  for (const auto& [key, value] : arguments.items()) {
    if (std::ranges::find(known, key) == known.end())
      return fail(fmt::format("Parameter '{}' is unexpected for command live-update", key));
    if (key == "prefault" || key == "coordinated") {
      if (!value.is_boolean()) return fail(fmt::format("Parameter '{}' expects a boolean", key));
      continue;
    }
    if (key == "x-commit-timeout-ms") {
      if (!value.is_number_unsigned() || value.get<uint64_t>() > 3'600'000)
        return fail("Parameter 'x-commit-timeout-ms' expects milliseconds (at most an hour)");
      continue;
    }
    if (!value.is_string()) return fail(fmt::format("Parameter '{}' expects a string", key));
  }
  constexpr std::string_view kModes = "use \"transfer\", \"exec\", \"kexec\" or \"fdstore\"";
  if (!arguments.contains("mode")) return fail(fmt::format("Parameter 'mode' is missing: {}", kModes));
  request.mode = arguments["mode"].get<std::string>();
  if (request.mode != "exec" && request.mode != "kexec" && request.mode != "transfer" && request.mode != "fdstore")
    return fail(fmt::format("Parameter 'mode' is '{}': {}", request.mode, kModes));
  const bool kexec = request.mode == "kexec";
  for (const char* key : {"kernel", "initrd", "cmdline"})
    if (!kexec && arguments.contains(key))
      return fail(fmt::format("Parameter '{}' applies to mode \"kexec\" only", key));
  const bool fd_store = request.mode == "fdstore";
  if ((kexec || fd_store) && arguments.contains("binary"))
    return fail("Parameter 'binary' applies to modes \"exec\" and \"transfer\" only");
  request.binary = arguments.contains("binary") ? arguments["binary"].get<std::string>() : own_binary();
  if (!kexec && !fd_store && request.binary.empty()) return fail("Parameter 'binary' is empty: name the new vmm binary");
  request.kernel = arguments.value("kernel", "");
  request.initrd = arguments.value("initrd", "");
  request.cmdline = arguments.value("cmdline", "");
  if (arguments.contains("prefault") && request.mode != "transfer")
    return fail("Parameter 'prefault' applies to mode \"transfer\" only");
  request.prefault = arguments.value("prefault", true);
  request.coordinated = arguments.value("coordinated", false);
  if (request.coordinated && !kexec) return fail("Parameter 'coordinated' applies to mode \"kexec\" only");
  if (request.coordinated) {
    // The coordinator (vmmctl host-update) loads the one kernel for every VM.
    for (const char* key : {"kernel", "initrd", "cmdline"})
      if (arguments.contains(key))
        return fail(fmt::format("Parameter '{}' does not apply to a coordinated kexec: the coordinator loads the "
                                "host's new kernel once for every VM",
                                key));
  } else if (kexec && request.kernel.empty()) {
    return fail("Parameter 'kernel' is missing: kexec needs the new kernel's image");
  }
  if (arguments.contains("x-inject")) {
    VMM_TRY_ASSIGN(fault, fault_from_string(arguments["x-inject"].get<std::string>()));
    if (!fault_applies(fault, request.mode))
      return fail(fmt::format("fault '{}' does not apply to mode \"{}\"", to_string(fault), request.mode));
    request.faults.fault = fault;
  }
  if (arguments.contains("x-commit-timeout-ms"))
    request.faults.commit_timeout = milliseconds(arguments["x-commit-timeout-ms"].get<uint64_t>());
  return request;
}

namespace {

std::unique_ptr<Handover> make_handover(const std::string& mode) {
  if (mode == "exec") return make_exec_handover();
  if (mode == "kexec") return make_kexec_handover();
  if (mode == "fdstore") return make_fd_store_handover();
  return make_transfer_handover();
}

}  // namespace

// One attempt, in the old process. Every mode runs these same phases; the
// handover supplies what differs.
control::CommandResult LiveUpdate::run(const json& arguments, const control::CommandContext& context) {
  auto parsed = parse(arguments);
  if (!parsed) return command_error(parsed.error().message);
  const UpdateRequest request = std::move(*parsed);
  // The update becomes a state of the machine before anything else happens:
  // from here on pause, resume and the commands that need them are refused.
  auto lease = machine_.begin_update();
  if (!lease) return command_error(lease.error().message);

  UpdateRecord record;
  {
    std::lock_guard lock(record_mutex_);
    record.generation = record_.generation;
    record.status = "in-progress";
    record.mode = request.mode;
    record_ = record;
  }
  const bool was_running = machine_.run_state() == RunState::running;
  bool paused_by_us = false;
  std::string phase = "prepare";
  auto phase_started = steady_clock::now();
  std::unique_ptr<Handover> handover = make_handover(request.mode);
  HandoverContext handover_context{machine_, request, launch_, server_, context, record, cancelled_, gate_};
  if (request.coordinated) gate_.begin();
  // However run() ends, a coordinated update's gates close with it.
  struct GateEnd {
    UpdateGate& gate;
    ~GateEnd() { gate.end(); }
  } gate_end{gate_};

  auto phase_done = [&] {
    record.add_phase(phase, steady_clock::now() - phase_started);
    machine_.emit_event("LIVE_UPDATE", {{"status", "in-progress"}, {"phase", phase},
                                        {"duration_us", record.phases.back().duration_us}});
  };
  auto next_phase = [&](std::string name) {
    phase = std::move(name);
    phase_started = steady_clock::now();
  };
  // Cancel, resume, report: the reply says exactly what became of the guest.
  auto failed = [&](const Error& error) -> control::CommandResult {
    std::string desc = fmt::format("live update ({}) failed during {}: {}", request.mode, phase, error.describe());
    handover->cancel(handover_context);
    std::string outcome;
    const bool shutting_down =
        cancelled_ || machine_.run_state() == RunState::shutdown || !machine_.shutdown_reason().empty();
    if (shutting_down) {
      // Never "running again": the VM stops with this vmm.
      outcome = "; the vmm is shutting down (" + machine_.shutdown_reason() +
                "), so the guest was not resumed and the VM stops with the vmm";
    } else if (paused_by_us) {
      if (auto resumed = lease->resume(); !resumed) {
        outcome = "; the guest could not be resumed (" + resumed.error().describe() + "): it stays paused";
      } else {
        outcome = "; the guest is running again";
      }
    } else {
      outcome = was_running ? "; the guest kept running" : "; the guest stays paused";
    }
    // The old process never writes guest memory during an update.
    if (!shutting_down) outcome += " and its memory is intact";
    spdlog::error("{}; the update was cancelled{}", desc, outcome);
    record.status = "failed";
    record.error = desc;
    // The phase it stopped in is kept, with the time it ran.
    record.add_phase(phase, steady_clock::now() - phase_started);
    record.failed_phase = phase;
    machine_.emit_event("LIVE_UPDATE", {{"status", "failed"}, {"phase", phase}, {"error", desc}});
    finish_record(record);
    return command_error(desc + outcome);
  };

  // --- prepare: the guest keeps running -------------------------------------
  auto prepared = handover->prepare(handover_context);
  if (!prepared) return failed(prepared.error());
  // After the preserves (which pin the pages), with the guest running.
  record.frames_at_prepare = sample_guest_frames(machine_);
  if (cancelled_) return failed(Error{ECANCELED, "the vmm is shutting down"});
  phase_done();

  // --- freeze: the blackout starts --------------------------------------------
  next_phase("freeze");
  record.blackout_started_ns = monotonic_ns();
  if (was_running) {
    auto paused = lease->pause(milliseconds(2000));
    if (!paused) return failed(paused.error());
    paused_by_us = true;
  }
  auto state = machine_.save_state();
  if (!state) return failed(state.error());
  auto& metadata = state->metadata;
  metadata.generation = record.generation;
  metadata.program_version = this_binary_versions().program;
  metadata.saved_at_realtime_ns = static_cast<uint64_t>(realtime_ns());
  metadata.host_monotonic_ns_at_save = static_cast<uint64_t>(monotonic_ns());
  metadata.was_running = was_running;
  metadata.vm_luo_token = prepared->vm_luo_token;
  for (const auto& msr : state->vcpus.front().msrs)
    if (msr.index == kMsrTsc) metadata.guest_tsc_at_save = msr.data;
  for (size_t i = 0; i < state->memory.size(); ++i) {
    auto& ref = state->memory[i];
    ref.luo_token = kFirstRegionToken + i;
    ref.vm_token = ref.spec.backing == memory::Backing::guest_memfd ? prepared->vm_luo_token : 0;
  }
  const auto encode_begin = steady_clock::now();
  auto written = migration::encode_into(*state, prepared->state_buffer);
  if (!written) return failed(written.error());
  spdlog::debug("live update: encoded the state in {} us",
                duration_cast<microseconds>(steady_clock::now() - encode_begin).count());
  spdlog::info("live update: froze {} ({} bytes of state)", migration::describe(*state), *written);
  phase_done();

  // --- handover ------------------------------------------------------------------
  next_phase("handover");
  record.handover_started_ns = monotonic_ns();
  machine_.flush_console();
  if (auto handed = handover->hand_over(handover_context, *written); !handed) return failed(handed.error());

  // Only a transfer comes back here: the new process owns the VM, the control
  // socket and the requesting connection. This one must not touch them again.
  const pid_t successor = handover->successor();
  successor_ = successor;
  handed_over_ = true;
  lease->hand_over();
  if (successor == 0) {
    // The fd store: no process runs the VM until the service starts again,
    // and the client's reply comes from here.
    spdlog::info("live update: the VM is in systemd's fd store; this vmm exits and the service's next start "
                 "restores it");
    record.status = "stored";
    finish_record(record);
    json reply = query();
    machine_.set_event_sink({});
    machine_.request_shutdown("the VM went into systemd's fd store", false);
    return reply;
  }
  spdlog::info("live update: the VM now runs in pid {}; this vmm exits", successor);
  if (context.handed_over) context.handed_over->store(true);
  machine_.set_event_sink({});
  machine_.request_shutdown(fmt::format("the VM moved to a new vmm (pid {})", successor), false);
  return json::object();
}

void LiveUpdate::finish_record(UpdateRecord record) {
  std::lock_guard lock(record_mutex_);
  if (record.status == "failed") record.generation = record_.generation;
  record_ = std::move(record);
}

void LiveUpdate::watch_after_resume(ResumePoint point) { watch_.start(point); }

namespace {

// What the guest watch found, as the record reports it.
void apply_findings(const GuestWatch::Findings& found, UpdateRecord& record) {
  record.guest_gap_us = found.guest_gap_us;
  record.guest_gap_reason = found.guest_gap_reason;
  record.brownout_status = found.brownout_status;
  record.brownout_us = found.brownout_us;
  record.baseline_pass_us = found.baseline_pass_us;
  record.brownout_reason = found.brownout_reason;
}

}  // namespace

void LiveUpdate::publish_watch(const GuestWatch::Findings& found) {
  std::lock_guard lock(record_mutex_);
  findings_ = found;
  apply_findings(found, record_);
}

void LiveUpdate::record_completed(UpdateRecord record) {
  record.pid = ::getpid();
  {
    std::lock_guard lock(record_mutex_);
    // The watchers may already have measured: keep what they found.
    apply_findings(findings_, record);
    record_ = std::move(record);
  }
  machine_.emit_event("LIVE_UPDATE", query());
}

}  // namespace vmm

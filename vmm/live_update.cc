#include "vmm/live_update.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "luo/exec_backend.h"
#include "luo/kernel_backend.h"
#include "luo/kexec.h"
#include "memory/mapping.h"
#include "migration/state_blob.h"
#include "vmm/control/server.h"

namespace vmm {
namespace {

using nlohmann::json;
using namespace std::chrono;

constexpr uint32_t kMsrTsc = 0x10;

std::unexpected<control::CommandError> command_error(std::string desc) {
  return std::unexpected(control::CommandError{control::kGenericError, std::move(desc)});
}

int64_t clock_ns(clockid_t clock) {
  timespec now{};
  clock_gettime(clock, &now);
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

// Room for the state: the VM part, devices and layout are small; a vCPU is
// ~12 KiB (XSAVE area, LAPIC page, CPUID, MSRs). Generous, and page-aligned.
uint64_t state_memfd_size(size_t vcpus) {
  return 256 * 1024 + uint64_t{vcpus} * 64 * 1024;
}

// One attempt at an update in the old process. Destroying it before the
// handover cancels everything it preserved.
struct Attempt {
  std::unique_ptr<luo::Backend> backend;
  luo::ExecBackend* exec_backend = nullptr;  // backend, when mode is exec
  std::unique_ptr<luo::Session> session;
  UniqueFd state_fd;
  memory::Mapping state_mapping;

  ~Attempt() { cancel(); }

  // Unfreezes and drops the session: everything it preserved is released.
  void cancel() {
    if (exec_backend && exec_backend->prepared()) exec_backend->cancel_exec();
    session.reset();  // an outgoing session dropped before the handover is cancelled
    state_mapping = memory::Mapping();
    state_fd.reset();
  }
};

}  // namespace

int64_t monotonic_ns() { return clock_ns(CLOCK_MONOTONIC); }
int64_t realtime_ns() { return clock_ns(CLOCK_REALTIME); }

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

json UpdateRecord::to_json() const {
  json phases_json = json::array();
  for (const auto& phase : phases) phases_json.push_back({{"name", phase.name}, {"duration_us", phase.duration_us}});
  json out = {{"status", status}, {"generation", generation}, {"phases", phases_json}};
  if (!mode.empty()) out["mode"] = mode;
  if (blackout_us) out["blackout_us"] = *blackout_us;
  if (guest_gap_us) out["guest_gap_us"] = *guest_gap_us;
  if (error) out["error"] = *error;
  return out;
}

Result<UpdateRecord> UpdateRecord::from_json(const json& in) {
  try {
    UpdateRecord record;
    record.status = in.at("status").get<std::string>();
    record.mode = in.value("mode", "");
    record.generation = in.at("generation").get<uint64_t>();
    for (const auto& phase : in.at("phases"))
      record.phases.push_back({phase.at("name").get<std::string>(), phase.at("duration_us").get<int64_t>()});
    if (in.contains("blackout_us")) record.blackout_us = in["blackout_us"].get<int64_t>();
    if (in.contains("error")) record.error = in["error"].get<std::string>();
    record.blackout_started_ns = in.value("blackout_started_ns", int64_t{0});
    record.handover_started_ns = in.value("handover_started_ns", int64_t{0});
    return record;
  } catch (const json::exception& e) {
    return fail(std::string("the update record handed over is malformed: ") + e.what());
  }
}

void UpdateRecord::add_phase(std::string name, nanoseconds duration) {
  phases.push_back({std::move(name), duration_cast<microseconds>(duration).count()});
}

Result<Fault> fault_from_string(std::string_view name) {
  for (Fault fault : {Fault::none, Fault::preserve_refused, Fault::state_too_large, Fault::corrupt_state,
                      Fault::wrong_token, Fault::wrong_vm_token})
    if (to_string(fault) == name) return fault;
  return fail(fmt::format("unknown fault '{}': use preserve-refused, state-too-large, corrupt-state, "
                          "wrong-token or wrong-vm-token", name));
}

std::string_view to_string(Fault fault) {
  switch (fault) {
    case Fault::none: return "none";
    case Fault::preserve_refused: return "preserve-refused";
    case Fault::state_too_large: return "state-too-large";
    case Fault::corrupt_state: return "corrupt-state";
    case Fault::wrong_token: return "wrong-token";
    case Fault::wrong_vm_token: return "wrong-vm-token";
  }
  return "none";
}

LiveUpdate::LiveUpdate(Machine& machine, RelaunchOptions relaunch, UpdateRecord last)
    : machine_(machine), relaunch_(std::move(relaunch)), record_(std::move(last)) {}

LiveUpdate::~LiveUpdate() {
  stopping_ = true;
  if (gap_thread_.joinable()) gap_thread_.join();
}

json LiveUpdate::query() const {
  std::lock_guard lock(record_mutex_);
  return record_.to_json();
}

Result<LiveUpdate::Request> LiveUpdate::parse(const json& arguments) const {
  Request request;
  for (const auto& [key, value] : arguments.items()) {
    static const std::vector<std::string> known{"mode", "binary", "kernel", "initrd", "cmdline", "x-inject"};
    if (std::ranges::find(known, key) == known.end())
      return fail(fmt::format("Parameter '{}' is unexpected for command live-update", key));
    if (!value.is_string()) return fail(fmt::format("Parameter '{}' expects a string", key));
  }
  if (!arguments.contains("mode")) return fail("Parameter 'mode' is missing: use \"exec\" or \"kexec\"");
  request.mode = arguments["mode"].get<std::string>();
  if (request.mode != "exec" && request.mode != "kexec")
    return fail(fmt::format("Parameter 'mode' is '{}': use \"exec\" or \"kexec\"", request.mode));
  const bool exec = request.mode == "exec";
  for (const char* key : {"kernel", "initrd", "cmdline"})
    if (exec && arguments.contains(key))
      return fail(fmt::format("Parameter '{}' applies to mode \"kexec\" only", key));
  if (!exec && arguments.contains("binary")) return fail("Parameter 'binary' applies to mode \"exec\" only");
  request.binary = arguments.value("binary", own_binary());
  request.kernel = arguments.value("kernel", "");
  request.initrd = arguments.value("initrd", "");
  request.cmdline = arguments.value("cmdline", "");
  if (!exec && request.kernel.empty()) return fail("Parameter 'kernel' is missing: kexec needs the new kernel's image");
  if (arguments.contains("x-inject")) {
    VMM_TRY_ASSIGN(fault, fault_from_string(arguments["x-inject"].get<std::string>()));
    request.fault = fault;
  }
  return request;
}

control::CommandResult LiveUpdate::run(const json& arguments, const control::CommandContext& context) {
  auto request = parse(arguments);
  if (!request) return command_error(request.error().message);
  if (in_progress_.exchange(true)) return command_error("a live update is already in progress");
  struct ClearInProgress {
    std::atomic<bool>& flag;
    ~ClearInProgress() { flag = false; }
  } clear{in_progress_};

  UpdateRecord record;
  {
    std::lock_guard lock(record_mutex_);
    record.generation = record_.generation;
  }
  record.status = "in-progress";
  record.mode = request->mode;
  {
    std::lock_guard lock(record_mutex_);
    record_ = record;
  }

  const bool was_running = machine_.run_state() == RunState::running;
  bool paused_by_us = false;
  std::string phase = "prepare";
  Attempt attempt;

  // Every failure ends here: cancel, resume, report. Guest memory is never
  // written by anything above, so it is intact.
  auto failed = [&](const Error& error) -> control::CommandResult {
    const std::string desc = fmt::format("live update ({}) failed during {}: {}", request->mode, phase, error.describe());
    attempt.cancel();
    if (paused_by_us) {
      if (auto resumed = machine_.resume(); !resumed)
        spdlog::error("cannot resume the guest after a failed update: {}", resumed.error().describe());
    }
    spdlog::error("{}; the session was cancelled{}", desc, was_running ? " and the guest resumed" : "");
    record.status = "failed";
    record.error = desc;
    machine_.emit_event("LIVE_UPDATE", {{"status", "failed"}, {"phase", phase}, {"error", desc}});
    finish_record(record);
    return command_error(desc + (was_running ? "; the guest is running again" : "; the guest stays paused") +
                         " and its memory is intact");
  };
  auto phase_done = [&](const std::string& name, steady_clock::time_point started) {
    record.add_phase(name, steady_clock::now() - started);
    machine_.emit_event("LIVE_UPDATE", {{"status", "in-progress"}, {"phase", name},
                                        {"duration_us", record.phases.back().duration_us}});
  };

  // --- prepare: the guest keeps running ---------------------------------
  auto started = steady_clock::now();
  // The new kernel must be at hand before anything is preserved.
  for (const std::string* image : {&request->kernel, &request->initrd}) {
    if (image->empty()) continue;
    UniqueFd file(::open(image->c_str(), O_RDONLY | O_CLOEXEC));
    if (!file) return failed(Error{errno, "cannot open the kexec image '" + *image + "'"});
  }
  if (request->mode == "exec") {
    auto backend = luo::ExecBackend::create();
    attempt.exec_backend = backend.get();
    attempt.backend = std::move(backend);
  } else {
    auto backend = luo::KernelBackend::open();
    if (!backend) return failed(backend.error());
    attempt.backend = std::move(*backend);
  }
  // kexec: the new kernel is loaded now, while the guest still runs, so the
  // load stays out of the blackout. Like `kexec --reuse-cmdline`, the
  // running kernel's command line is the default.
  luo::Kexec kexec;
  if (request->mode == "kexec") {
    std::string cmdline = request->cmdline;
    if (cmdline.empty()) {
      auto current = luo::Kexec::current_cmdline();
      if (!current) return failed(current.error());
      cmdline = *current;
    }
    if (auto loaded = kexec.load(luo::KexecImage{request->kernel,
                                                  request->initrd.empty() ? std::nullopt
                                                                          : std::optional(request->initrd),
                                                  cmdline});
        !loaded)
      return failed(loaded.error());
  }
  auto session = attempt.backend->create_session(machine_.config().name);
  if (!session) return failed(session.error());
  attempt.session = std::move(*session);
  if (auto kept = attempt.session->preserve(machine_.vm_fd(), kVmToken); !kept)
    return failed(kept.error().with_context("preserving the VM"));
  const auto& regions = machine_.memory().regions();
  for (size_t i = 0; i < regions.size(); ++i) {
    if (auto kept = attempt.session->preserve(regions[i]->fd(), kFirstRegionToken + i); !kept)
      return failed(kept.error().with_context("preserving memory region '" + regions[i]->spec().name + "'"));
  }
  if (request->fault == Fault::preserve_refused) {
    // An eventfd: a kind of file no LUO handler takes.
    UniqueFd unsupported(::eventfd(0, EFD_CLOEXEC));
    if (auto kept = attempt.session->preserve(unsupported.ref(), kStateToken + 1); !kept)
      return failed(kept.error().with_context("preserving an injected eventfd"));
  }
  const uint64_t state_size =
      request->fault == Fault::state_too_large ? 4096 : state_memfd_size(machine_.config().vcpus);
  attempt.state_fd.reset(::memfd_create("vmm-state", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!attempt.state_fd) return failed(Error{errno, "cannot create the state memfd"});
  if (::ftruncate(attempt.state_fd.get(), static_cast<off_t>(state_size)) != 0)
    return failed(Error{errno, "cannot size the state memfd"});
  auto state_mapping = memory::Mapping::map_shared(attempt.state_fd.ref(), state_size);
  if (!state_mapping) return failed(state_mapping.error());
  attempt.state_mapping = std::move(*state_mapping);
  if (auto kept = attempt.session->preserve(attempt.state_fd.ref(), kStateToken); !kept)
    return failed(kept.error().with_context("preserving the state memfd"));
  phase_done("prepare", started);

  // --- freeze: the blackout starts ---------------------------------------
  phase = "freeze";
  started = steady_clock::now();
  record.blackout_started_ns = monotonic_ns();
  if (was_running) {
    auto paused = machine_.pause();
    if (!paused) return failed(paused.error());
    paused_by_us = true;
  }
  auto state = machine_.save_state();
  if (!state) return failed(state.error());
  state->metadata.generation = record.generation;
  state->metadata.program_version = fmt::format("{}.{}.{}", VMM_VERSION_MAJOR, VMM_VERSION_MINOR, VMM_VERSION_MICRO);
  state->metadata.saved_at_realtime_ns = static_cast<uint64_t>(realtime_ns());
  state->metadata.host_monotonic_ns_at_save = static_cast<uint64_t>(monotonic_ns());
  state->metadata.was_running = was_running;
  state->metadata.vm_luo_token = kVmToken;
  for (const auto& msr : state->vcpus.front().msrs)
    if (msr.index == kMsrTsc) state->metadata.guest_tsc_at_save = msr.data;
  for (size_t i = 0; i < state->memory.size(); ++i) {
    auto& ref = state->memory[i];
    ref.luo_token = kFirstRegionToken + i;
    ref.vm_token = ref.spec.backing == memory::Backing::guest_memfd ? kVmToken : 0;
  }
  auto written = migration::encode_into(*state, attempt.state_mapping.bytes());
  if (!written) return failed(written.error());
  phase_done("freeze", started);
  spdlog::info("live update: froze {} ({} bytes of state)", migration::describe(*state), *written);

  // --- handover -----------------------------------------------------------
  phase = "handover";
  if (request->mode == "kexec") {
    // Session fds stay open until the reboot: closing them would unpreserve.
    auto rebooted = kexec.reboot();
    return failed(rebooted ? Error{0, "reboot returned"} : rebooted.error());
  }

  auto handover = attempt.exec_backend->prepare_exec();
  if (!handover) return failed(handover.error());
  record.status = "in-progress";
  record.handover_started_ns = monotonic_ns();
  std::vector<std::string> argv{request->binary, "restore", "--session", machine_.config().name};
  for (auto& arg : handover->manifest_args()) argv.push_back(arg);
  std::vector<int> inherited;
  // The rollback target is this very binary, by descriptor: after a package
  // upgrade its path names the new file, but the descriptor still runs the old.
  UniqueFd own_exe(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC));
  if (own_exe) inherited.push_back(own_exe.get());
  if (server_) {
    argv.insert(argv.end(), {"--control-socket", relaunch_.control_socket_path, "--control-socket-fd",
                             std::to_string(server_->listening_fd().get())});
    inherited.push_back(server_->listening_fd().get());
  }
  if (context.connection_fd >= 0) {
    argv.insert(argv.end(), {"--reply-fd", std::to_string(context.connection_fd)});
    if (context.id) argv.insert(argv.end(), {"--reply-id", context.id->dump()});
    inherited.push_back(context.connection_fd);
  }
  json carried = record.to_json();
  carried["blackout_started_ns"] = record.blackout_started_ns;
  carried["handover_started_ns"] = record.handover_started_ns;
  argv.insert(argv.end(), {"--update-record", carried.dump(), "--console", relaunch_.console, "--log-level",
                           relaunch_.log_level, "--kvm-device", relaunch_.kvm_device});
  if (own_exe)
    argv.insert(argv.end(), {"--rollback-binary", "/proc/self/fd/" + std::to_string(own_exe.get())});
  if (request->fault == Fault::corrupt_state || request->fault == Fault::wrong_token ||
      request->fault == Fault::wrong_vm_token)
    argv.insert(argv.end(), {"--x-inject", std::string(to_string(request->fault))});

  spdlog::info("live update: exec {}", request->binary);
  machine_.flush_console();
  // New connections wait in the listen backlog for the new process rather
  // than being accepted here and cut off by the exec.
  if (server_) server_->stop_accepting();
  auto exec = attempt.exec_backend->exec(luo::ExecRequest{request->binary, argv, std::nullopt, inherited});
  // Only a failed exec comes back here.
  if (server_) {
    if (auto resumed = server_->resume_accepting(); !resumed)
      spdlog::error("control socket: {}", resumed.error().describe());
  }
  return failed(exec ? Error{0, "exec returned"} : exec.error());
}

void LiveUpdate::finish_record(UpdateRecord record) {
  std::lock_guard lock(record_mutex_);
  if (record.status == "failed") record.generation = record_.generation;
  record_ = std::move(record);
}

void LiveUpdate::watch_guest_gap(uint64_t heartbeat_at_save) {
  gap_thread_ = std::thread([this, heartbeat_at_save] { measure_guest_gap(heartbeat_at_save); });
}

void LiveUpdate::record_completed(UpdateRecord record) {
  {
    std::lock_guard lock(record_mutex_);
    record.guest_gap_us = record_.guest_gap_us;  // the gap may already be measured: keep it
    record_ = std::move(record);
  }
  machine_.emit_event("LIVE_UPDATE", query());
}

// The guest stamps each heartbeat with its TSC: the largest step between the
// heartbeat before the freeze and those after the resume is the gap the guest
// saw (blackout plus the brown-out of re-faulting its pages in the new VM).
void LiveUpdate::measure_guest_gap(uint64_t heartbeat_at_save) {
  auto& guest = machine_.guest();
  if (!guest.guest_speaks() || guest.tsc_khz() == 0) return;
  const auto deadline = steady_clock::now() + seconds(5);
  while (!stopping_ && steady_clock::now() < deadline) {
    if (machine_.run_state() != RunState::running) return;  // a paused VM has no gap to show yet
    if (guest.status().heartbeat >= heartbeat_at_save + 5) {
      const auto gap = guest.largest_gap_since(heartbeat_at_save > 0 ? heartbeat_at_save - 1 : 0);
      if (!gap) {
        spdlog::warn("live update: the guest's heartbeat ring moved past the freeze before it was read; "
                     "guest_gap_us is not reported");
        return;
      }
      std::lock_guard lock(record_mutex_);
      record_.guest_gap_us = static_cast<int64_t>(gap->gap_tsc * 1000 / guest.tsc_khz());
      return;
    }
    std::this_thread::sleep_for(milliseconds(2));
  }
}

}  // namespace vmm

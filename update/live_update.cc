#include "update/live_update.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "luo/exec_backend.h"
#include "luo/kernel_backend.h"
#include "luo/kexec.h"
#include "base/mapping.h"
#include "migration/state_blob.h"
#include "vmm/control/server.h"
#include "update/transfer.h"

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

// The state memfd: sized before the pause, written during it.
struct StateMemfd {
  UniqueFd fd;
  Mapping mapping;

  Result<void> create(uint64_t size) {
    fd.reset(::memfd_create("vmm-state", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (!fd) return fail_errno("cannot create the state memfd");
    if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return fail_errno("cannot size the state memfd");
    VMM_TRY_ASSIGN(mapped, Mapping::map_shared(fd.ref(), size));
    // Allocate and map every page now: the first touch of a fresh memfd
    // page costs tens of us here, and the state is written in the blackout.
    VMM_TRY(with_context(mapped.populate_page_tables(), "preparing the state memfd"));
    mapping = std::move(mapped);
    return {};
  }
};

// What an exec or kexec attempt holds; cancel() before the handover releases
// everything it preserved.
struct LuoAttempt {
  std::unique_ptr<luo::Backend> backend;
  luo::ExecBackend* exec_backend = nullptr;  // backend, when mode is exec
  std::unique_ptr<luo::Session> session;
  StateMemfd state;

  ~LuoAttempt() { cancel(); }

  void cancel() {
    if (exec_backend && exec_backend->prepared()) exec_backend->cancel_exec();
    session.reset();  // an outgoing session dropped before the handover is cancelled
    state = StateMemfd();
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
  if (pid) out["pid"] = *pid;
  if (brownout_status) out["brownout_status"] = *brownout_status;
  if (brownout_us) out["brownout_us"] = *brownout_us;
  if (baseline_pass_us) out["baseline_pass_us"] = *baseline_pass_us;
  if (brownout_reason) out["brownout_reason"] = *brownout_reason;
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
                      Fault::wrong_token, Fault::wrong_vm_token, Fault::target_refuses, Fault::target_crash})
    if (to_string(fault) == name) return fault;
  return fail(fmt::format("unknown fault '{}': use preserve-refused, state-too-large, corrupt-state, "
                          "wrong-token, wrong-vm-token, target-refuses or target-crash", name));
}

std::string_view to_string(Fault fault) {
  switch (fault) {
    case Fault::none: return "none";
    case Fault::preserve_refused: return "preserve-refused";
    case Fault::state_too_large: return "state-too-large";
    case Fault::corrupt_state: return "corrupt-state";
    case Fault::wrong_token: return "wrong-token";
    case Fault::wrong_vm_token: return "wrong-vm-token";
    case Fault::target_refuses: return "target-refuses";
    case Fault::target_crash: return "target-crash";
  }
  return "none";
}

LiveUpdate::LiveUpdate(Machine& machine, RelaunchOptions relaunch, UpdateRecord last)
    : machine_(machine), relaunch_(std::move(relaunch)), record_(std::move(last)) {}

LiveUpdate::~LiveUpdate() {
  stopping_ = true;
  if (gap_thread_.joinable()) gap_thread_.join();
  if (brownout_thread_.joinable()) brownout_thread_.join();
}

json LiveUpdate::query() const {
  std::lock_guard lock(record_mutex_);
  return record_.to_json();
}

Result<LiveUpdate::Request> LiveUpdate::parse(const json& arguments) const {
  Request request;
  for (const auto& [key, value] : arguments.items()) {
    static const std::vector<std::string> known{"mode", "binary", "kernel", "initrd", "cmdline", "prefault",
                                                "x-inject"};
    if (std::ranges::find(known, key) == known.end())
      return fail(fmt::format("Parameter '{}' is unexpected for command live-update", key));
    if (key == "prefault") {
      if (!value.is_boolean()) return fail("Parameter 'prefault' expects a boolean");
      continue;
    }
    if (!value.is_string()) return fail(fmt::format("Parameter '{}' expects a string", key));
  }
  constexpr std::string_view kModes = "use \"transfer\", \"exec\" or \"kexec\"";
  if (!arguments.contains("mode")) return fail(fmt::format("Parameter 'mode' is missing: {}", kModes));
  request.mode = arguments["mode"].get<std::string>();
  if (request.mode != "exec" && request.mode != "kexec" && request.mode != "transfer")
    return fail(fmt::format("Parameter 'mode' is '{}': {}", request.mode, kModes));
  const bool kexec = request.mode == "kexec";
  for (const char* key : {"kernel", "initrd", "cmdline"})
    if (!kexec && arguments.contains(key))
      return fail(fmt::format("Parameter '{}' applies to mode \"kexec\" only", key));
  if (kexec && arguments.contains("binary"))
    return fail("Parameter 'binary' applies to modes \"exec\" and \"transfer\" only");
  request.binary = arguments.value("binary", own_binary());
  request.kernel = arguments.value("kernel", "");
  request.initrd = arguments.value("initrd", "");
  request.cmdline = arguments.value("cmdline", "");
  if (arguments.contains("prefault") && request.mode != "transfer")
    return fail("Parameter 'prefault' applies to mode \"transfer\" only");
  request.prefault = arguments.value("prefault", true);
  if (kexec && request.kernel.empty()) return fail("Parameter 'kernel' is missing: kexec needs the new kernel's image");
  if (arguments.contains("x-inject")) {
    VMM_TRY_ASSIGN(fault, fault_from_string(arguments["x-inject"].get<std::string>()));
    request.fault = fault;
    const bool for_transfer = fault == Fault::state_too_large || fault == Fault::corrupt_state ||
                              fault == Fault::target_crash || fault == Fault::target_refuses;
    const bool for_luo = fault != Fault::target_crash && fault != Fault::target_refuses;
    if ((request.mode == "transfer" && !for_transfer) || (request.mode != "transfer" && !for_luo))
      return fail(fmt::format("fault '{}' does not apply to mode \"{}\"", to_string(fault), request.mode));
  }
  return request;
}

// The bookkeeping of one attempt in the old process: its record, the
// phase it is in, and the one way every failure ends.
struct LiveUpdate::Attempt {
  LiveUpdate& update;
  Request request;
  UpdateRecord record;
  UpdateLease lease;  // the machine's update state, for the whole attempt
  std::string phase = "prepare";
  bool was_running = false;
  bool paused_by_us = false;
  steady_clock::time_point phase_started = steady_clock::now();
  std::function<void()> cancel;  // releases what the mode set up

  // Cancel, resume, report. Guest memory is never written by an update in
  // the old process, so it is intact.
  control::CommandResult failed(const Error& error) {
    const std::string desc =
        fmt::format("live update ({}) failed during {}: {}", request.mode, phase, error.describe());
    if (cancel) cancel();
    if (paused_by_us) {
      if (auto resumed = lease.resume(); !resumed)
        spdlog::error("cannot resume the guest after a failed update: {}", resumed.error().describe());
    }
    spdlog::error("{}; the update was cancelled{}", desc, was_running ? " and the guest resumed" : "");
    record.status = "failed";
    record.error = desc;
    update.machine_.emit_event("LIVE_UPDATE", {{"status", "failed"}, {"phase", phase}, {"error", desc}});
    update.finish_record(record);
    return command_error(desc + (was_running ? "; the guest is running again" : "; the guest stays paused") +
                         " and its memory is intact");
  }

  void phase_done() {
    record.add_phase(phase, steady_clock::now() - phase_started);
    update.machine_.emit_event("LIVE_UPDATE", {{"status", "in-progress"}, {"phase", phase},
                                               {"duration_us", record.phases.back().duration_us}});
  }
  void next_phase(std::string name) {
    phase = std::move(name);
    phase_started = steady_clock::now();
  }

  // The blackout starts: pause (if running) and encode the whole state
  // into `out`, region i under token kFirstRegionToken + i.
  Result<size_t> freeze_into(std::span<uint8_t> out) {
    record.blackout_started_ns = monotonic_ns();
    if (was_running) {
      VMM_TRY(lease.pause());
      paused_by_us = true;
    }
    VMM_TRY_ASSIGN(state, update.machine_.save_state());
    state.metadata.generation = record.generation;
    state.metadata.program_version =
        fmt::format("{}.{}.{}", VMM_VERSION_MAJOR, VMM_VERSION_MINOR, VMM_VERSION_MICRO);
    state.metadata.saved_at_realtime_ns = static_cast<uint64_t>(realtime_ns());
    state.metadata.host_monotonic_ns_at_save = static_cast<uint64_t>(monotonic_ns());
    state.metadata.was_running = was_running;
    state.metadata.vm_luo_token = kVmToken;
    for (const auto& msr : state.vcpus.front().msrs)
      if (msr.index == kMsrTsc) state.metadata.guest_tsc_at_save = msr.data;
    for (size_t i = 0; i < state.memory.size(); ++i) {
      auto& ref = state.memory[i];
      ref.luo_token = kFirstRegionToken + i;
      ref.vm_token = ref.spec.backing == memory::Backing::guest_memfd ? kVmToken : 0;
    }
    const auto encode_begin = steady_clock::now();
    VMM_TRY_ASSIGN(written, migration::encode_into(state, out));
    spdlog::debug("live update: encoded the state in {} us",
                  duration_cast<microseconds>(steady_clock::now() - encode_begin).count());
    spdlog::info("live update: froze {} ({} bytes of state)", migration::describe(state), written);
    return written;
  }
};

control::CommandResult LiveUpdate::run(const json& arguments, const control::CommandContext& context) {
  auto request = parse(arguments);
  if (!request) return command_error(request.error().message);
  auto lease = machine_.begin_update();
  if (!lease) return command_error(lease.error().describe());

  Attempt attempt{*this, std::move(*request), {}, std::move(*lease)};
  {
    std::lock_guard lock(record_mutex_);
    attempt.record.generation = record_.generation;
    attempt.record.status = "in-progress";
    attempt.record.mode = attempt.request.mode;
    record_ = attempt.record;
  }
  attempt.was_running = machine_.run_state() == RunState::running;
  if (attempt.request.mode == "transfer") return run_transfer(attempt, context);
  return run_luo(attempt, context);
}

// Exec and kexec: everything goes through a LUO session.
control::CommandResult LiveUpdate::run_luo(Attempt& attempt, const control::CommandContext& context) {
  const Request& request = attempt.request;
  UpdateRecord& record = attempt.record;
  LuoAttempt luo;
  attempt.cancel = [&luo] { luo.cancel(); };

  // --- prepare: the guest keeps running ---------------------------------
  // The new kernel must be at hand before anything is preserved.
  for (const std::string* image : {&request.kernel, &request.initrd}) {
    if (image->empty()) continue;
    UniqueFd file(::open(image->c_str(), O_RDONLY | O_CLOEXEC));
    if (!file) return attempt.failed(Error{errno, "cannot open the kexec image '" + *image + "'"});
  }
  if (request.mode == "exec") {
    auto backend = luo::ExecBackend::create();
    luo.exec_backend = backend.get();
    luo.backend = std::move(backend);
  } else {
    auto backend = luo::KernelBackend::open();
    if (!backend) return attempt.failed(backend.error());
    luo.backend = std::move(*backend);
  }
  // kexec: the new kernel is loaded now, while the guest still runs, so the
  // load stays out of the blackout. Like `kexec --reuse-cmdline`, the
  // running kernel's command line is the default.
  luo::Kexec kexec;
  if (request.mode == "kexec") {
    std::string cmdline = request.cmdline;
    if (cmdline.empty()) {
      auto current = luo::Kexec::current_cmdline();
      if (!current) return attempt.failed(current.error());
      cmdline = *current;
    }
    if (auto loaded = kexec.load(luo::KexecImage{request.kernel,
                                                  request.initrd.empty() ? std::nullopt
                                                                         : std::optional(request.initrd),
                                                  cmdline});
        !loaded)
      return attempt.failed(loaded.error());
  }
  auto session = luo.backend->create_session(machine_.config().name);
  if (!session) return attempt.failed(session.error());
  luo.session = std::move(*session);
  if (auto kept = luo.session->preserve(machine_.vm_fd(), kVmToken); !kept)
    return attempt.failed(kept.error().with_context("preserving the VM"));
  const auto& regions = machine_.memory().regions();
  for (size_t i = 0; i < regions.size(); ++i) {
    if (auto kept = luo.session->preserve(regions[i]->fd(), kFirstRegionToken + i); !kept)
      return attempt.failed(kept.error().with_context("preserving memory region '" + regions[i]->spec().name + "'"));
  }
  if (request.fault == Fault::preserve_refused) {
    // An eventfd: a kind of file no LUO handler takes.
    UniqueFd unsupported(::eventfd(0, EFD_CLOEXEC));
    if (auto kept = luo.session->preserve(unsupported.ref(), kStateToken + 1); !kept)
      return attempt.failed(kept.error().with_context("preserving an injected eventfd"));
  }
  if (auto created = luo.state.create(request.fault == Fault::state_too_large ? 4096
                                                                             : state_memfd_size(machine_.config().vcpus));
      !created)
    return attempt.failed(created.error());
  if (auto kept = luo.session->preserve(luo.state.fd.ref(), kStateToken); !kept)
    return attempt.failed(kept.error().with_context("preserving the state memfd"));
  attempt.phase_done();

  // --- freeze: the blackout starts ---------------------------------------
  attempt.next_phase("freeze");
  if (auto frozen = attempt.freeze_into(luo.state.mapping.bytes()); !frozen) return attempt.failed(frozen.error());
  attempt.phase_done();

  // --- handover -----------------------------------------------------------
  attempt.next_phase("handover");
  if (request.mode == "kexec") {
    // Session fds stay open until the reboot: closing them would unpreserve.
    auto rebooted = kexec.reboot();
    return attempt.failed(rebooted ? Error{0, "reboot returned"} : rebooted.error());
  }

  auto handover = luo.exec_backend->prepare_exec();
  if (!handover) return attempt.failed(handover.error());
  record.handover_started_ns = monotonic_ns();
  std::vector<std::string> argv{request.binary, "restore", "--session", machine_.config().name};
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
  argv.insert(argv.end(), {"--update-record", carried_record(record).dump()});
  for (auto& arg : relaunch_args()) argv.push_back(std::move(arg));
  if (own_exe)
    argv.insert(argv.end(), {"--rollback-binary", "/proc/self/fd/" + std::to_string(own_exe.get())});
  if (request.fault == Fault::corrupt_state || request.fault == Fault::wrong_token ||
      request.fault == Fault::wrong_vm_token)
    argv.insert(argv.end(), {"--x-inject", std::string(to_string(request.fault))});

  spdlog::info("live update: exec {}", request.binary);
  machine_.flush_console();
  // New connections wait in the listen backlog for the new process rather
  // than being accepted here and cut off by the exec.
  if (server_) server_->stop_accepting();
  auto exec = luo.exec_backend->exec(luo::ExecRequest{request.binary, argv, std::nullopt, inherited});
  // Only a failed exec comes back here.
  if (server_) {
    if (auto resumed = server_->resume_accepting(); !resumed)
      spdlog::error("control socket: {}", resumed.error().describe());
  }
  return attempt.failed(exec ? Error{0, "exec returned"} : exec.error());
}

// Transfer: the new vmm builds its VM before the pause; see transfer.h.
control::CommandResult LiveUpdate::run_transfer(Attempt& attempt, const control::CommandContext& context) {
  const Request& request = attempt.request;
  UpdateRecord& record = attempt.record;
  StateMemfd state;
  std::optional<transfer::Target> target;
  bool socket_handed = false;
  attempt.cancel = [&] {
    if (target) target->abort();  // a target that never committed never ran the guest
    if (socket_handed && server_) {
      if (auto resumed = server_->resume_accepting(); !resumed)
        spdlog::error("control socket: {}", resumed.error().describe());
    }
  };

  // --- prepare: the guest keeps running ---------------------------------
  if (auto created = state.create(request.fault == Fault::state_too_large ? 4096
                                                                         : state_memfd_size(machine_.config().vcpus));
      !created)
    return attempt.failed(created.error());
  std::vector<std::string> args;
  if (server_) args.insert(args.end(), {"--control-socket", relaunch_.control_socket_path});
  for (auto& arg : relaunch_args()) args.push_back(std::move(arg));
  auto spawned = transfer::Target::spawn(request.binary, args);
  if (!spawned) return attempt.failed(spawned.error());
  target.emplace(std::move(*spawned));
  spdlog::info("live update: started {} (pid {}) to take the VM over", request.binary, target->pid());

  std::vector<FdRef> files;
  memory::MemoryLayout layout;
  for (const auto& region : machine_.memory().regions()) {
    files.push_back(region->fd());
    layout.regions.push_back(region->spec());
  }
  files.push_back(state.fd.ref());
  json hello = {{"name", machine_.config().name}, {"vcpus", machine_.config().vcpus},
                {"regions", transfer::layout_to_json(layout)}, {"prefault", request.prefault},
                {"cpuid", transfer::cpuid_to_json(machine_.vcpu_cpuid())}};
  if (request.fault == Fault::target_refuses) hello["x-inject"] = to_string(request.fault);
  if (auto sent = transfer::send(target->channel(), "hello", hello, files); !sent)
    return attempt.failed(sent.error());
  // Building a VM takes a few ms, plus per GiB ~1.5 ms of memslots and
  // ~0.15-0.3 s of page-table prefault here.
  const auto build_timeout = seconds(30) + seconds(machine_.config().ram_size >> 30);
  auto ready = transfer::receive(target->channel(), "ready", build_timeout);
  if (!ready) return attempt.failed(ready.error().with_context("the new vmm could not build the VM"));
  spdlog::info("live update: the new vmm built the VM in {} us", ready->body.value("prebuild_us", int64_t{-1}));
  attempt.phase_done();

  // Connections made from here on wait in the backlog for the new process
  // (joining the accept thread takes a while: not inside the blackout).
  if (server_) {
    server_->stop_accepting();
    socket_handed = true;
  }

  // --- freeze: the blackout starts ---------------------------------------
  attempt.next_phase("freeze");
  auto frozen = attempt.freeze_into(state.mapping.bytes());
  if (!frozen) return attempt.failed(frozen.error());
  attempt.phase_done();

  // --- handover: the state, the socket and the client go over -------------
  attempt.next_phase("handover");
  record.handover_started_ns = monotonic_ns();
  machine_.flush_console();
  json body = {{"bytes", *frozen}, {"record", carried_record(record)}, {"socket", false}, {"connection", false}};
  if (request.fault != Fault::none) body["x-inject"] = to_string(request.fault);
  std::vector<FdRef> handed;
  if (server_) {
    handed.push_back(server_->listening_fd());
    body["socket"] = true;
  }
  if (context.connection_fd >= 0) {
    handed.push_back(FdRef(context.connection_fd));
    body["connection"] = true;
    if (context.id) body["reply_id"] = *context.id;
  }
  if (auto sent = transfer::send(target->channel(), "state", body, handed); !sent)
    return attempt.failed(sent.error());
  auto commit = transfer::receive(target->channel(), "commit", seconds(30));
  if (!commit) {
    target->abort();
    // A commit that crossed the timeout: the guest may have run over there,
    // so the state saved here is stale and must not run again.
    if (auto late = transfer::receive(target->channel(), "commit", milliseconds(0)); late) {
      attempt.paused_by_us = false;
      attempt.was_running = false;
      return attempt.failed(Error{ETIMEDOUT, "the new vmm committed after the 30 s wait and was stopped; the guest "
                                             "may have run there, so this copy stays paused for an operator"});
    }
    return attempt.failed(commit.error().with_context("the new vmm could not restore the VM"));
  }

  // Committed: the new process runs the guest and answers the client. This
  // one must not touch the VM, the socket or the connection again. It waits
  // until the guest runs there before tearing its own VM down: on a small
  // host that teardown would compete with the resume for the CPUs.
  target->committed();
  const pid_t successor = target->pid();
  if (auto resumed = transfer::receive(target->channel(), "resumed", seconds(10)); !resumed)
    spdlog::warn("live update: {}", resumed.error().describe());
  spdlog::info("live update: the VM now runs in pid {}; this vmm exits", successor);
  handed_over_ = true;
  if (context.handed_over) context.handed_over->store(true);
  machine_.set_event_sink({});
  machine_.request_shutdown(fmt::format("the VM moved to a new vmm (pid {})", successor), false);
  return json::object();
}

json LiveUpdate::carried_record(const UpdateRecord& record) {
  json carried = record.to_json();
  carried["blackout_started_ns"] = record.blackout_started_ns;
  carried["handover_started_ns"] = record.handover_started_ns;
  return carried;
}

std::vector<std::string> LiveUpdate::relaunch_args() const {
  return {"--console", relaunch_.console, "--log-level", relaunch_.log_level, "--kvm-device", relaunch_.kvm_device};
}

void LiveUpdate::finish_record(UpdateRecord record) {
  std::lock_guard lock(record_mutex_);
  if (record.status == "failed") record.generation = record_.generation;
  record_ = std::move(record);
}

void LiveUpdate::watch_after_resume(ResumePoint point) {
  {
    std::lock_guard lock(record_mutex_);
    record_.brownout_status = "pending";
  }
  gap_thread_ = std::thread([this, point] { measure_guest_gap(point.heartbeat_at_save); });
  brownout_thread_ = std::thread([this, point] { measure_brownout(point); });
}

void LiveUpdate::record_completed(UpdateRecord record) {
  record.pid = ::getpid();
  {
    std::lock_guard lock(record_mutex_);
    // The watchers may already have measured: keep what they found.
    record.guest_gap_us = record_.guest_gap_us;
    record.brownout_status = record_.brownout_status;
    record.brownout_us = record_.brownout_us;
    record.baseline_pass_us = record_.baseline_pass_us;
    record.brownout_reason = record_.brownout_reason;
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

void LiveUpdate::set_brownout(std::string status, std::optional<int64_t> us, std::optional<std::string> reason) {
  std::lock_guard lock(record_mutex_);
  record_.brownout_status = std::move(status);
  record_.brownout_us = us;
  record_.brownout_reason = std::move(reason);
  if (record_.brownout_reason) spdlog::info("live update: brown-out not measured: {}", *record_.brownout_reason);
  if (record_.brownout_us) spdlog::info("live update: brown-out {} us", *record_.brownout_us);
}

// The brown-out: a rebuilt VM starts with empty (shadow) page tables, so the
// guest re-faults every page it touches. The guest's sweep reads all of its
// RAM once per pass and stamps each pass with its TSC. Baseline: the median
// of the last (up to 8) passes that ended before the freeze. The brown-out
// ends where the first pass that started after the resume runs within 1.25x
// of that baseline; its resolution is the guest's sweep period.
void LiveUpdate::measure_brownout(ResumePoint point) {
  auto& guest = machine_.guest();
  const uint64_t khz = guest.tsc_khz();
  if (!guest.guest_speaks() || khz == 0)
    return set_brownout("unavailable", std::nullopt, "the guest does not speak the test guest protocol");
  if (guest.sweep_ms() == 0)
    return set_brownout("unavailable", std::nullopt,
                        "the guest does not sweep its RAM (boot the test guest with sweep-ms=N)");
  if (!point.running)
    return set_brownout("unavailable", std::nullopt, "the VM was paused across the update");
  std::vector<uint64_t> before;
  uint64_t last_seen = 0;
  for (const auto& pass : guest.sweeps_since(0)) {
    if (pass.end_tsc <= point.guest_tsc_at_save && pass.end_tsc > pass.start_tsc)
      before.push_back(devices::sweep_pass_us(pass, khz));
    last_seen = pass.number;
  }
  if (before.empty())
    return set_brownout("unavailable", std::nullopt, "the guest finished no RAM sweep pass before the update");
  if (before.size() > 8) before.erase(before.begin(), before.end() - 8);
  std::ranges::sort(before);
  const uint64_t baseline_us = before[before.size() / 2];
  {
    std::lock_guard lock(record_mutex_);
    record_.baseline_pass_us = static_cast<int64_t>(baseline_us);
  }
  // A pass over 8 GiB that re-faults every page takes ~30 s here.
  const auto deadline = steady_clock::now() + seconds(120) + seconds(10 * (machine_.config().ram_size >> 30));
  while (!stopping_ && steady_clock::now() < deadline) {
    if (machine_.run_state() != RunState::running)
      return set_brownout("unavailable", std::nullopt, "the VM stopped running before the guest swept its RAM again");
    for (const auto& pass : guest.sweeps_since(last_seen)) {
      last_seen = pass.number;
      if (pass.start_tsc < point.guest_tsc_at_resume || pass.end_tsc <= pass.start_tsc) continue;
      if (devices::sweep_pass_us(pass, khz) * 4 <= baseline_us * 5) {
        return set_brownout("measured",
                            static_cast<int64_t>((pass.start_tsc - point.guest_tsc_at_resume) * 1000 / khz),
                            std::nullopt);
      }
    }
    std::this_thread::sleep_for(milliseconds(5));
  }
  if (!stopping_)
    set_brownout("unavailable", std::nullopt, "the guest's RAM sweep did not get back to its speed before the update");
}

}  // namespace vmm

// The exec and kexec handovers, new side (`vmm restore`): retrieve the VM's
// files from the LUO session by token and rebuild the VM around them.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>


#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "luo/exec_backend.h"
#include "kvm/system.h"
#include "luo/kernel_backend.h"
#include "update/arrival.h"
#include "update/fd_store.h"
#include "update/restore.h"
#include "update/session_holder.h"
#include "update/agent_backend.h"
#include "update/session_source.h"
#include "vmm/control/server.h"

extern char** environ;

namespace vmm {
namespace {

using nlohmann::json;
using namespace std::chrono;

// What lives beside the VM in this process: the retrieved session.
struct LuoSide {
  std::unique_ptr<luo::Backend> backend;  // exec only: its sessions' fds
  std::unique_ptr<luo::Session> session;
};

// Sends the client that asked for the update the reply it is owed, when the
// update cannot complete here.
void reply_failure(int connection_fd, const json& reply_id, const std::string& desc) {
  if (connection_fd < 0) return;
  json reply = {{"error", {{"class", "GenericError"}, {"desc", desc}}}};
  if (!reply_id.is_null()) reply["id"] = reply_id;
  const std::string line = reply.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  [[maybe_unused]] ssize_t n = ::send(connection_fd, line.data(), line.size(), MSG_NOSIGNAL);
}

// The kexec side's session: from the kernel, or, when an earlier restore of
// it failed and holds it (the kernel then says it was retrieved already),
// from that restore's holders.
// With a LUO agent, the agent: it retrieved the session once and hands out
// the same one again after a failed restore.
Result<std::unique_ptr<luo::Session>> retrieve_kernel_session(const std::string& name) {
  Result<std::unique_ptr<luo::Session>> session = std::unexpected(Error{});
  {
    // /dev/liveupdate is single-open: held only for the retrieve, so another
    // vmm can restore its own VM (or a later update can start) meanwhile.
    VMM_TRY_ASSIGN(source, open_session_source(session_source_options()));
    session = source.backend->retrieve_session(name);
    if (source.kind == "agent") return session;
  }
  if (session || session.error().code != EINVAL) return session;
  auto held = take_held_session(name);
  if (!held)
    return std::unexpected(session.error().with_context(
        fmt::format("the LUO session '{}' was retrieved already, and {}", name, held.error().describe())));
  spdlog::info("vmm restore: took the LUO session '{}' over from the holders of an earlier restore", name);
  return std::unique_ptr<luo::Session>(
      std::make_unique<luo::KernelSession>(std::move(*held), name, true, luo::real_kernel_syscalls()));
}

}  // namespace

int discard_luo_session(const std::string& name) {
  auto session = retrieve_kernel_session(name);
  if (!session) {
    spdlog::error("vmm restore --discard: {}", session.error().describe());
    return 1;
  }
  // Closing the session finishes it; FINISH first, to report its error.
  if (auto finished = (*session)->finish(); !finished) {
    spdlog::error("vmm restore --discard: FINISH of '{}' failed: {}", name, finished.error().describe());
    return 1;
  }
  spdlog::warn("vmm restore --discard: the LUO session '{}' is finished and the guest's memory released", name);
  return 0;
}

void apply_launch(const LaunchOptions& launch, MachineConfig& config) {
  if (launch.console == "stdout") {
    config.console = ConsoleKind::stdout_console;
  } else if (launch.console == "none") {
    config.console = ConsoleKind::none;
  } else {
    config.console = ConsoleKind::file;
    config.console_path = launch.console;
  }
  config.kvm_path = launch.kvm_device;
}

Error roll_back(int handover_fd, int rollback_fd, const std::vector<int>& other_fds, const std::string& failure) {
  // Everything crosses as it came: the handover record's descriptors and
  // the session's (untouched: from_manifest changes nothing when it fails).
  for (int fd : {handover_fd, rollback_fd})
    if (fd >= 0) ::fcntl(fd, F_SETFD, 0);
  for (int fd : other_fds)
    if (fd >= 0) ::fcntl(fd, F_SETFD, 0);
  std::string argv0 = "/proc/self/fd/" + std::to_string(rollback_fd);
  std::vector<std::string> args{argv0, "restore", "--handover-fd", std::to_string(handover_fd), "--previous-failure",
                                failure};
  std::vector<char*> argv;
  for (auto& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  spdlog::error("{}; rolling back to the previous vmm", failure);
  ::fexecve(rollback_fd, argv.data(), environ);
  return Error{errno, "cannot run the previous vmm binary"};
}

std::variant<Arrival, int> arrive_by_luo(const LuoArrivalOptions& options) {
  const int64_t process_started_ns = monotonic_ns();
  const int64_t process_started_realtime_ns = realtime_ns();
  const auto restore_started = steady_clock::now();
  const bool exec_mode = options.handover_fd >= 0;
  const bool is_rollback = !options.previous_failure.empty();
  auto side = std::make_shared<LuoSide>();
  Arrival arrival;
  HandoverRecord& handover = arrival.handover;
  int rollback_fd = -1;

  // --- the handover record -----------------------------------------------------
  if (exec_mode) {
    auto bytes = read_handover_memfd(FdRef(options.handover_fd));
    if (!bytes) {
      spdlog::error("vmm restore: {}", bytes.error().describe());
      return 2;
    }
    rollback_fd = rollback_fd_of(*bytes).value_or(-1);
    auto decoded = decode_handover(*bytes);
    if (!decoded) {
      const std::string desc = "live update failed: the new vmm cannot read the handover: " + decoded.error().describe();
      if (rollback_fd >= 0 && !is_rollback) {
        Error failed = roll_back(options.handover_fd, rollback_fd, {}, desc);
        spdlog::error("{}", failed.describe());
      } else {
        spdlog::error("{}", desc);
      }
      return 1;
    }
    handover = std::move(*decoded);
  } else {
    handover.mode = options.fd_store ? "fdstore" : "kexec";
    handover.session = options.session;
    handover.launch = options.launch;
    handover.fault = options.fault;
  }
  handover.previous_failure = options.previous_failure;
  // A test's fault is for the attempt that failed, not for the rollback.
  if (is_rollback) handover.fault = Fault::none;
  UpdateRecord& record = handover.record;
  record.mode = handover.mode;
  if (exec_mode && record.handover_started_ns > 0)
    record.add_phase("handover", nanoseconds(process_started_ns - record.handover_started_ns));
  auto fd_at = [&](const std::optional<size_t>& slot) {
    return slot && *slot < handover.fds.size() ? handover.fds[*slot] : -1;
  };
  const int listening_fd = fd_at(handover.listening_socket);
  const int connection_fd = fd_at(handover.connection);
  // The inherited descriptors must not leak into anything started later.
  for (int fd : {options.handover_fd, listening_fd, connection_fd, rollback_fd})
    if (fd >= 0) ::fcntl(fd, F_SETFD, FD_CLOEXEC);

  // A failed restore never writes guest memory and never finishes the
  // session. After an exec, the session lives only in this process's fds, so
  // it goes, unchanged, back to the vmm that started the update (a rollback),
  // which restores the VM and reports the failure. After a kexec the session
  // is held here for another attempt.
  struct GiveUp {
    std::shared_ptr<LuoSide> side;
    bool exec_mode, is_rollback;
    int handover_fd, rollback_fd, listening_fd, connection_fd;
    json reply_id;
    std::string session_name;
    bool session_retrieved = false;

    int operator()(const Error& error) const {
      std::string desc = "live update failed during restore: " + error.describe();
      if (exec_mode && !is_rollback && rollback_fd >= 0) {
        // Only descriptors still open cross (a failed socket takeover closed its own).
        std::vector<int> others;
        for (int fd : {listening_fd, connection_fd})
          if (fd >= 0 && ::fcntl(fd, F_GETFD) >= 0) others.push_back(fd);
        Error failed;
        if (auto* exec_backend = dynamic_cast<luo::ExecBackend*>(side->backend.get())) {
          spdlog::error("{}; rolling back to the previous vmm", desc);
          const std::string path = "/proc/self/fd/" + std::to_string(rollback_fd);
          std::vector<std::string> argv{path, "restore", "--handover-fd", std::to_string(handover_fd),
                                        "--previous-failure", desc};
          std::vector<int> inherited{handover_fd, rollback_fd};
          inherited.insert(inherited.end(), others.begin(), others.end());
          auto passed = exec_backend->pass_on(luo::ExecRequest{path, argv, std::nullopt, inherited});
          failed = passed ? Error{0, "exec returned"} : passed.error();
        } else {
          failed = roll_back(handover_fd, rollback_fd, others, desc);
        }
        // Only a failed rollback comes back here: the session's files live
        // only in this process, so the VM goes with it.
        desc += "; the rollback to the previous vmm failed too (" + failed.describe() + "): the VM is lost";
      } else if (exec_mode) {
        desc += is_rollback ? "; this was already the rollback: the VM is lost" : "; there is no previous vmm to "
                                                                                  "roll back to: the VM is lost";
      }
      spdlog::error("{}", desc);
      reply_failure(connection_fd, reply_id, desc);
      if (!session_retrieved || exec_mode) return 1;
      if (dynamic_cast<FdStoreSession*>(side->session.get())) {
        spdlog::error("the VM's files stay in the service's fd store: the service's next start tries again "
                      "(`systemctl clean --what=fdstore UNIT` drops them, and the guest's memory with them)");
        return 1;
      }
      if (dynamic_cast<AgentSession*>(side->session.get())) {
        spdlog::error("the LUO agent keeps the unfinished session '{}' and the guest's memory: `vmm restore "
                      "--session {}` tries again, `vmm restore --session {} --discard` drops it",
                      session_name, session_name, session_name);
        return 1;
      }
      auto* kernel_session = dynamic_cast<luo::KernelSession*>(side->session.get());
      if (!kernel_session) return 1;
      return hold_session(kernel_session->fd(), session_name);
    }
  };
  GiveUp give_up{side,          exec_mode,     is_rollback,        options.handover_fd, rollback_fd,
                 listening_fd,  connection_fd, handover.reply_id,  handover.session};

  // --- retrieve: the session, then the VM and its files by token ----------------
  if (exec_mode) {
    const int manifest_fd = options.luo_manifest_fd >= 0 ? options.luo_manifest_fd : fd_at(handover.luo_manifest);
    auto opened = luo::ExecBackend::from_manifest(
        manifest_fd, luo::ExecOptions{luo::kvm_vm_factory(handover.launch.kvm_device), luo::real_exec_syscalls()});
    if (!opened) return give_up(opened.error());
    side->backend = std::move(*opened);
    auto session = side->backend->retrieve_session(handover.session);
    if (!session) return give_up(session.error());
    side->session = std::move(*session);
  } else {
    // What can be checked before the retrieve is: a failure here leaves the
    // session untouched in the kernel, for the next `vmm restore`.
    if (auto kvm = kvm::System::open(handover.launch.kvm_device); !kvm) return give_up(kvm.error());
    // A VM fd retrieved here is this process's alone: a control socket that
    // cannot be served must fail the restore before the retrieve, not after.
    if (const std::string& socket = handover.launch.control_socket_path; !socket.empty())
      if (auto listenable = control::Server::check_listen_path(socket); !listenable) {
        const int status = give_up(listenable.error());
        if (options.fd_store)
          spdlog::error("the VM's files stay in the service's fd store: once the socket's folder is right, the "
                        "service's next start restores the VM");
        else
          spdlog::error("the LUO session '{}' is untouched: once the socket's folder is right, `vmm restore "
                        "--session {}` restores the VM", handover.session, handover.session);
        return status;
      }
    auto session = options.fd_store ? options.fd_store->retrieve_session(handover.session)
                                    : retrieve_kernel_session(handover.session);
    if (!session) return give_up(session.error());
    side->session = std::move(*session);
  }
  give_up.session_retrieved = true;
  if (!exec_mode) {
    // The record crossed the kexec in the session; an older vmm put none there.
    if (auto record_fd = side->session->retrieve(kRecordToken); record_fd) {
      auto bytes = read_handover_memfd(record_fd->ref());
      auto carried = bytes ? decode_handover(*bytes) : Result<HandoverRecord>(std::unexpected(bytes.error()));
      if (carried) {
        record = carried->record;
        record.mode = handover.mode;
      } else {
        spdlog::warn("vmm restore: the update record from before the kexec is unreadable ({}); starting a new one",
                     carried.error().describe());
      }
    }
  }
  auto retrieved = retrieve_vm(*side->session, handover.fault);
  if (!retrieved) return give_up(retrieved.error());

  // The guest's clocks move on by the time it spent frozen. CLOCK_MONOTONIC
  // survives an exec but not a kexec, where the wall clock has to do.
  auto& metadata = retrieved->state.metadata;
  const int64_t frozen_ns = exec_mode ? monotonic_ns() - static_cast<int64_t>(metadata.host_monotonic_ns_at_save)
                                      : realtime_ns() - static_cast<int64_t>(metadata.saved_at_realtime_ns);
  advance_clocks(retrieved->state, frozen_ns);
  arrival.was_running = metadata.was_running;
  arrival.resume_point = {retrieved->state.test_device.heartbeat_at_save, metadata.guest_tsc_at_save,
                          guest_tsc(retrieved->state), arrival.was_running};
  record.generation = metadata.generation;
  if (!exec_mode) {
    // CLOCK_MONOTONIC restarted with the new kernel: the blackout's start
    // is placed on this kernel's clock by the wall-clock time since the save.
    record.blackout_started_ns = monotonic_ns() - (realtime_ns() - static_cast<int64_t>(metadata.saved_at_realtime_ns));
    record.handover_started_ns = 0;
    // The handover: from the save to this process's start, the reboot into
    // this kernel included, on the wall clock (the only one both kernels share).
    record.add_phase("handover",
                     nanoseconds(process_started_realtime_ns - static_cast<int64_t>(metadata.saved_at_realtime_ns)));
  }

  MachineConfig config;
  apply_launch(handover.launch, config);
  RestoreInputs inputs{std::move(retrieved->vm_fd), std::move(retrieved->region_files),
                       exec_mode ? memory::SlotKind::userspace : memory::SlotKind::guest_memfd,
                       std::move(retrieved->state)};
  auto machine = Machine::restore(config, std::move(inputs));
  if (!machine) return give_up(machine.error());
  if (handover.fault == Fault::give_up_after_rebuild)
    return give_up(Error{ECANCELED, "the test fault give-up-after-rebuild: this restore stops once it rebuilt the VM"});
  arrival.machine = std::move(*machine);
  if (listening_fd >= 0) arrival.listening_socket = UniqueFd(listening_fd);
  if (connection_fd >= 0) arrival.connection = UniqueFd(connection_fd);
  arrival.restore_started = restore_started;
  arrival.commit = [] { return Result<void>{}; };
  arrival.after_resume = [side](UpdateRecord& done) {
    const auto finish_started = steady_clock::now();
    if (auto finished = side->session->finish(); !finished)
      spdlog::warn("live update: FINISH failed: {}", finished.error().describe());
    done.add_phase("finish", steady_clock::now() - finish_started);
  };
  arrival.prefault_after_resume = true;
  arrival.give_up = give_up;
  arrival.keep_alive = side;
  return arrival;
}

}  // namespace vmm

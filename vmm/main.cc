// vmm: a minimal VMM on KVM whose guest memory never moves during live updates.
//
//   vmm run ...       launch a VM
//   vmm restore ...   rebuild a VM from a LUO session: after a kexec (by hand
//                     or from a systemd unit), or started by `live-update`
//                     in exec mode (which passes the hidden handover options)
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "luo/exec_backend.h"
#include "luo/kernel_backend.h"
#include "luo/session.h"
#include "vmm/commands.h"
#include "vmm/control/server.h"
#include "update/live_update.h"
#include "machine/machine.h"
#include "update/restore.h"
#include "base/size.h"
#include "update/transfer.h"
#include "migration/state_blob.h"
#include "base/mapping.h"

namespace vmm {
namespace {

using namespace std::chrono;
using nlohmann::json;

// Options both subcommands take.
struct CommonOptions {
  std::string console = "stdout";
  std::string control_socket;
  std::string kvm_device = "/dev/kvm";
  std::string log_level = "info";
};

struct RunOptions {
  std::string memory = "256M";
  std::string shared_memory = "16M";
  std::string vcpus = "1";  // parsed by check_run_options, so a bad count gets our error and exit status
  std::string backing = "guest_memfd";
  std::string kernel;
  std::string cmdline;
  std::string name;
  // Whether these appeared on the command line: an empty value given on
  // purpose is refused, not taken for "absent".
  bool kernel_given = false;
  bool control_socket_given = false;
  bool name_given = false;
};

struct RestoreOptions {
  std::string session;
  int manifest_fd = -1;          // exec handover; absent: the kernel's /dev/liveupdate
  int control_socket_fd = -1;    // the listening socket, handed over
  int reply_fd = -1;             // the connection that asked for the update
  std::string reply_id;          // its request id, as JSON
  std::string update_record;     // the update so far, as JSON
  std::string rollback_binary;   // the vmm that started the update
  std::string previous_failure;  // set when this process retries a failed restore
  std::string inject;
  std::vector<std::string> argv; // this process's own command line
};

void apply_console(const CommonOptions& common, MachineConfig& config) {
  if (common.console == "stdout") {
    config.console = ConsoleKind::stdout_console;
  } else if (common.console == "none") {
    config.console = ConsoleKind::none;
  } else {
    config.console = ConsoleKind::file;
    config.console_path = common.console;
  }
  config.kvm_path = common.kvm_device;
}

// A VM name also names its LUO session, the systemd instance of
// docs/vmm-restore@.service and the files named after it there
// (/run/vmm/NAME.sock, /var/log/vmm/NAME.console): a path component, never a
// path, and short enough for the session.
Result<void> check_vm_name(const std::string& name) {
  if (name.empty())
    return fail("--name is empty: give the VM a name, or leave --name out for vm-PID");
  if (name.size() > luo::kMaxSessionNameLength)
    return fail(fmt::format("--name '{}' is {} bytes long: the name of the VM names its LUO session, which holds at "
                            "most {} bytes; use a shorter name",
                            name, name.size(), luo::kMaxSessionNameLength));
  const auto is_name_byte = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
  };
  if (!std::isalnum(static_cast<unsigned char>(name.front())) || !std::ranges::all_of(name, is_name_byte))
    return fail("--name '" + name + "' cannot name a VM: the name also names its LUO session and files such as "
                "NAME.sock; use only letters, digits, '.', '_' and '-', starting with a letter or digit");
  return {};
}

// What `vmm run` refuses from its options alone, before it builds anything
// (exit status 2). What only the machine or the host can judge (--memory 0,
// --vcpus 33, a kernel that is no PVH ELF, a path that cannot be opened) is
// refused while the VM is built (exit status 1).
Result<uint32_t> check_run_options(const CommonOptions& common, const RunOptions& options) {
  if (options.kernel_given && options.kernel.empty())
    return fail("--kernel is empty: give the path of a PVH ELF kernel, or leave --kernel out to boot the embedded "
                "test guest");
  if (common.console.empty())
    return fail("--console is empty: use stdout, none, or the path of a file");
  if (common.kvm_device.empty())
    return fail("--kvm-device is empty: give the path of the KVM device, or leave --kvm-device out for /dev/kvm");
  if (options.control_socket_given && common.control_socket.empty())
    return fail("--control-socket is empty: give the path of the socket to create, or leave --control-socket out "
                "to run without one");
  constexpr size_t kMaxSocketPath = sizeof(sockaddr_un::sun_path) - 1;
  if (common.control_socket.size() > kMaxSocketPath)
    return fail(fmt::format("--control-socket '{}' is {} bytes long: a Unix socket path holds at most {}; use a "
                            "shorter path, e.g. in /run/vmm",
                            common.control_socket, common.control_socket.size(), kMaxSocketPath));
  if (options.name_given) VMM_TRY(check_vm_name(options.name));

  uint32_t vcpus = 0;
  const char* begin = options.vcpus.data();
  const char* end = begin + options.vcpus.size();
  const auto [rest, ec] = std::from_chars(begin, end, vcpus);
  if (ec != std::errc() || rest != end || options.vcpus.empty())
    return fail(fmt::format("--vcpus '{}' is not a number of vCPUs: use a whole number from 1 to {}", options.vcpus,
                            kMaxVcpus));
  return vcpus;
}

Result<MachineConfig> machine_config(const CommonOptions& common, const RunOptions& options) {
  VMM_TRY_ASSIGN(vcpus, check_run_options(common, options));
  MachineConfig config;
  config.name = options.name_given ? options.name : "vm-" + std::to_string(::getpid());
  VMM_TRY_ASSIGN(ram, parse_size(options.memory, "--memory"));
  VMM_TRY_ASSIGN(shared, parse_size(options.shared_memory, "--shared-memory"));
  config.ram_size = ram;
  config.shared_size = shared;
  config.vcpus = vcpus;
  auto backing = memory::backing_from_string(options.backing);
  if (!backing)
    return fail("--memory-backing '" + options.backing + "' is not one of: guest_memfd, memfd");
  config.ram_backing = *backing;
  if (!options.kernel.empty()) config.kernel_path = options.kernel;
  config.cmdline = options.cmdline;
  apply_console(common, config);
  return config;
}

RelaunchOptions relaunch_options(const CommonOptions& common) {
  return RelaunchOptions{common.control_socket, common.console, common.log_level, common.kvm_device};
}

// Blocks SIGINT/SIGTERM in every thread (threads inherit the mask) and
// returns a signalfd the main loop polls for them.
Result<UniqueFd> shutdown_signals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  if (pthread_sigmask(SIG_BLOCK, &signals, nullptr) != 0) return fail("cannot block SIGINT/SIGTERM");
  UniqueFd fd(::signalfd(-1, &signals, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!fd) return fail_errno("cannot create a signalfd");
  return fd;
}

// Waits until a signal arrives or the machine asks to shut down.
void wait_for_shutdown(Machine& machine, FdRef signals) {
  pollfd fds[2] = {{signals.get(), POLLIN, 0}, {machine.shutdown_fd().get(), POLLIN, 0}};
  while (true) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      machine.request_shutdown("poll failed in the main loop", false);
      return;
    }
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo info{};
      if (::read(signals.get(), &info, sizeof info) == sizeof info) {
        const char* name = sigabbrev_np(static_cast<int>(info.ssi_signo));
        machine.request_shutdown(name ? std::string("received SIG") + name : "received a signal", false);
      }
      return;
    }
    if (fds[1].revents & POLLIN) return;
  }
}

// The VM's life after it is built: control socket, run, wait, shut down.
struct Runtime {
  std::unique_ptr<Machine> machine;
  std::unique_ptr<LiveUpdate> update;
  std::unique_ptr<MachineCommands> commands;
  std::unique_ptr<control::Server> server;

  Runtime(std::unique_ptr<Machine> built, const CommonOptions& common, UpdateRecord record)
      : machine(std::move(built)),
        update(std::make_unique<LiveUpdate>(*machine, relaunch_options(common), std::move(record))),
        commands(std::make_unique<MachineCommands>(*machine, *update)) {}

  ~Runtime() {
    if (server) server->stop();
    if (machine) {
      machine->stop();
      machine->set_event_sink({});
    }
  }

  Result<void> serve_socket(const std::string& path, int inherited_fd) {
    if (path.empty()) return {};
    if (inherited_fd >= 0) {
      VMM_TRY_ASSIGN(adopted, control::Server::adopt(UniqueFd(inherited_fd), path, *commands));
      server = std::move(adopted);
    } else {
      VMM_TRY_ASSIGN(listening, control::Server::listen(path, *commands));
      server = std::move(listening);
    }
    update->set_control_server(server.get());
    machine->set_event_sink([this](const std::string& name, const json& data) { server->emit_event(name, data); });
    return {};
  }

  int wait(FdRef signals) {
    wait_for_shutdown(*machine, signals);
    if (update->handed_over()) {
      // The teardown that follows (the VM's page tables, its mappings) runs
      // at idle priority: the guest now runs in the new process on the same CPUs.
      sched_param idle{};
      ::sched_setscheduler(0, SCHED_IDLE, &idle);
    }
    machine->stop();
    machine->set_event_sink({});
    if (server) {
      // After a transfer the socket at the path is the new process's: leave it.
      if (update->handed_over()) {
        UniqueFd released = server->detach();
      } else {
        server->stop();
      }
    }
    return machine->shutdown_failed() ? 1 : 0;
  }
};

int run_vm(const CommonOptions& common, const RunOptions& options) {
  auto signals = shutdown_signals();
  if (!signals) {
    spdlog::error("{}", signals.error().describe());
    return 1;
  }
  auto config = machine_config(common, options);
  if (!config) {
    spdlog::error("{}", config.error().describe());
    return 2;
  }
  auto machine = Machine::create(*config);
  if (!machine) {
    spdlog::error("{}", machine.error().describe());
    return 1;
  }
  Runtime runtime(std::move(*machine), common, UpdateRecord{});
  if (auto served = runtime.serve_socket(common.control_socket, -1); !served) {
    spdlog::error("{}", served.error().describe());
    return 1;
  }
  if (auto started = runtime.machine->start(); !started) {
    spdlog::error("{}", started.error().describe());
    return 1;
  }
  const MachineConfig& running = runtime.machine->config();
  spdlog::info("VM '{}' running: {} RAM in {}, {} shared, {} vCPU(s){}", running.name,
               memory::format_size(running.ram_size), memory::to_string(running.ram_backing),
               memory::format_size(running.shared_size), running.vcpus,
               common.control_socket.empty() ? "" : ", control socket " + common.control_socket);
  return runtime.wait(signals->ref());
}

// Sends the client that asked for the update the reply it is owed, when the
// update cannot complete (the new process is about to give up).
void reply_failure(int reply_fd, const std::string& reply_id, const std::string& desc) {
  if (reply_fd < 0) return;
  json reply = {{"error", {{"class", control::kGenericError}, {"desc", desc}}}};
  if (!reply_id.empty()) reply["id"] = json::parse(reply_id, nullptr, false);
  const std::string line = reply.dump() + "\n";
  [[maybe_unused]] ssize_t n = ::send(reply_fd, line.data(), line.size(), MSG_NOSIGNAL);
}

// The new process of a transfer live update (transfer.h): builds the VM
// while the old process still runs it, then takes it over.
int take_over_vm(const CommonOptions& common, int channel_fd) {
  const auto started = steady_clock::now();
  auto signals = shutdown_signals();
  if (!signals) {
    spdlog::error("{}", signals.error().describe());
    return 1;
  }
  auto adopted = migration::FdChannel::adopt(UniqueFd(channel_fd));
  if (!adopted) {
    spdlog::error("transfer-target: {}; this command is started by `live-update` in mode transfer",
                  adopted.error().describe());
    return 2;
  }
  const migration::FdChannel channel = std::move(*adopted);
  // Before "commit" every failure is reported to the old process, which
  // resumes its own VM; nothing here has run the guest or written its memory.
  auto refuse = [&](const Error& error) {
    spdlog::error("transfer: cannot take the VM over: {}", error.describe());
    [[maybe_unused]] auto sent = transfer::send(channel, "error", {{"message", error.describe()}});
    return 1;
  };

  // --- prepare: build the VM on the same memory ----------------------------
  auto hello = transfer::receive(channel, "hello", seconds(30));
  if (!hello) return refuse(hello.error());
  auto layout = transfer::layout_from_json(hello->body.value("regions", json::array()));
  if (!layout) return refuse(layout.error());
  if (hello->fds.size() != layout->regions.size() + 1)
    return refuse(Error{EPROTO, fmt::format("got {} files for {} memory regions and the state", hello->fds.size(),
                                            layout->regions.size())});
  if (hello->body.value("x-inject", "") == to_string(Fault::target_refuses))
    return refuse(Error{EINVAL, "injected fault: the new vmm refuses to build the VM"});
  UniqueFd state_fd = std::move(hello->fds.back());
  hello->fds.pop_back();
  MachineConfig config;
  apply_console(common, config);
  config.name = hello->body.value("name", "vm");
  config.vcpus = hello->body.value("vcpus", 0u);
  auto cpuid = transfer::cpuid_from_json(hello->body.value("cpuid", json::array()));
  if (!cpuid) return refuse(cpuid.error());
  auto machine = Machine::prebuild(config, PrebuildInputs{std::move(*layout), std::move(hello->fds),
                                                          memory::SlotKind::userspace,
                                                          hello->body.value("prefault", true), std::move(*cpuid)});
  if (!machine) return refuse(machine.error());
  struct stat state_file{};
  if (::fstat(state_fd.get(), &state_file) != 0) return refuse(Error{errno, "cannot stat the state memfd"});
  auto state_mapping = Mapping::map_shared(state_fd.ref(), static_cast<size_t>(state_file.st_size));
  if (!state_mapping) return refuse(state_mapping.error());
  // Mapped in now, not when the state is read inside the blackout.
  if (auto mapped = state_mapping->populate_page_tables(); !mapped) return refuse(mapped.error());
  const auto prebuild_us = duration_cast<microseconds>(steady_clock::now() - started).count();
  if (auto sent = transfer::send(channel, "ready", {{"pid", ::getpid()}, {"prebuild_us", prebuild_us}}); !sent) {
    spdlog::error("transfer: {}", sent.error().describe());
    return 1;
  }

  // --- handover: wait for the state; the old process may also cancel -------
  auto handover = transfer::receive(channel, "state");
  if (!handover) {
    spdlog::info("transfer: the old vmm cancelled the update ({})", handover.error().describe());
    return 0;
  }
  const int64_t received_ns = monotonic_ns();
  const json& body = handover->body;
  auto carried = UpdateRecord::from_json(body.value("record", json::object()));
  if (!carried) return refuse(carried.error());
  UpdateRecord record = std::move(*carried);
  record.mode = "transfer";
  const std::string inject = body.value("x-inject", "");
  if (inject == to_string(Fault::target_crash)) {
    spdlog::error("transfer: injected fault: the new vmm dies before committing");
    std::_Exit(3);
  }
  size_t next_fd = 0;
  UniqueFd listening, connection;
  if (body.value("socket", false) && next_fd < handover->fds.size()) listening = std::move(handover->fds[next_fd++]);
  if (body.value("connection", false) && next_fd < handover->fds.size())
    connection = std::move(handover->fds[next_fd++]);
  const size_t bytes = body.value("bytes", size_t{0});
  if (bytes > state_mapping->size())
    return refuse(Error{EPROTO, fmt::format("the state is {} bytes but its memfd only {}", bytes, state_mapping->size())});
  std::span<const uint8_t> blob(state_mapping->data(), bytes);
  std::vector<uint8_t> corrupted;
  if (inject == to_string(Fault::corrupt_state)) {
    // A private copy: the memfd keeps the good blob for the old process.
    corrupted.assign(blob.begin(), blob.end());
    corrupted[corrupted.size() / 2] ^= 0x5a;
    blob = corrupted;
  }
  auto state = migration::decode(blob);
  if (!state) return refuse(state.error().with_context("the saved state is unusable"));
  if (record.handover_started_ns > 0)
    record.add_phase("handover", nanoseconds(monotonic_ns() - record.handover_started_ns));

  // --- restore: load the state into the prebuilt VM and run it -------------
  const auto restore_started = steady_clock::now();
  advance_clocks(*state, monotonic_ns() - static_cast<int64_t>(state->metadata.host_monotonic_ns_at_save));
  if (auto loaded = (*machine)->load_state(*state); !loaded) return refuse(loaded.error());
  record.generation = state->metadata.generation;
  const bool was_running = state->metadata.was_running;
  const LiveUpdate::ResumePoint resume_point{state->test_device.heartbeat_at_save, state->metadata.guest_tsc_at_save,
                                             guest_tsc(*state), was_running};

  // The point of no return: from here on this process owns the VM.
  if (auto sent = transfer::send(channel, "commit"); !sent)
    spdlog::warn("transfer: {}; taking the VM over anyway", sent.error().describe());
  Runtime runtime(std::move(*machine), common, record);
  if (was_running) {
    if (auto resumed = runtime.machine->resume(); !resumed) {
      spdlog::error("transfer: cannot resume the VM: {}", resumed.error().describe());
      return 1;
    }
  }
  // The blackout ends here: the vCPUs run again (or, paused before, are ready to).
  const int64_t resumed_ns = monotonic_ns();
  if (record.blackout_started_ns > 0) record.blackout_us = (resumed_ns - record.blackout_started_ns) / 1000;
  record.add_phase("restore", steady_clock::now() - restore_started);
  // The old process may now tear its VM down.
  if (auto sent = transfer::send(channel, "resumed"); !sent) spdlog::debug("transfer: {}", sent.error().describe());
  runtime.update->watch_after_resume(resume_point);
  spdlog::debug("transfer: state received {} us after the handover started", (received_ns - record.handover_started_ns) / 1000);

  if (listening) {
    if (auto served = runtime.serve_socket(common.control_socket, listening.release()); !served)
      spdlog::error("transfer: the control socket could not be taken over: {}", served.error().describe());
  }
  record.status = "completed";
  record.error.reset();
  record.generation += 1;
  spdlog::info("live update (transfer) completed: generation {}, blackout {} us, pid {}", record.generation,
               record.blackout_us.value_or(-1), ::getpid());
  runtime.update->record_completed(record);
  if (connection && runtime.server) {
    json reply = {{"return", runtime.update->query()}};
    if (body.contains("reply_id")) reply["id"] = body["reply_id"];
    runtime.server->adopt_client(std::move(connection), reply);
  }
  return runtime.wait(signals->ref());
}

int restore_vm(const CommonOptions& common, const RestoreOptions& options) {
  const int64_t process_started_ns = monotonic_ns();
  const auto restore_started = steady_clock::now();
  auto signals = shutdown_signals();
  if (!signals) {
    spdlog::error("{}", signals.error().describe());
    return 1;
  }
  // The previous binary, by descriptor ("/proc/self/fd/N"), for a rollback.
  int rollback_fd = -1;
  if (options.rollback_binary.starts_with("/proc/self/fd/"))
    rollback_fd = std::atoi(options.rollback_binary.c_str() + std::strlen("/proc/self/fd/"));
  // The inherited descriptors must not leak into anything we start later.
  for (int fd : {options.control_socket_fd, options.reply_fd, rollback_fd})
    if (fd >= 0) ::fcntl(fd, F_SETFD, FD_CLOEXEC);

  UpdateRecord record;
  record.mode = options.manifest_fd >= 0 ? "exec" : "kexec";
  if (!options.update_record.empty()) {
    auto parsed = json::parse(options.update_record, nullptr, false);
    auto carried = UpdateRecord::from_json(parsed);
    if (!carried) {
      spdlog::error("{}", carried.error().describe());
      return 2;
    }
    record = std::move(*carried);
    if (record.handover_started_ns > 0)
      record.add_phase("handover", nanoseconds(process_started_ns - record.handover_started_ns));
  }
  Fault fault = Fault::none;
  if (!options.inject.empty()) {
    auto parsed = fault_from_string(options.inject);
    if (!parsed) {
      spdlog::error("{}", parsed.error().describe());
      return 2;
    }
    fault = *parsed;
  }

  std::unique_ptr<luo::Backend> backend;
  const bool exec_mode = options.manifest_fd >= 0;
  bool session_retrieved = false;

  // A failed restore never writes guest memory and never finishes the
  // session. After an exec, the session lives only in this process's fds, so
  // it is handed on, unchanged, to the vmm that started the update (a
  // rollback), which restores the VM and reports the failure. After a kexec
  // the kernel keeps the session for another `vmm restore`.
  auto give_up = [&](const Error& error) {
    const std::string desc = "live update failed during restore: " + error.describe();
    auto* exec_backend = dynamic_cast<luo::ExecBackend*>(backend.get());
    if (exec_backend && !options.rollback_binary.empty() && options.previous_failure.empty()) {
      spdlog::error("{}; rolling back to {}", desc, options.rollback_binary);
      std::vector<std::string> argv{options.rollback_binary};
      for (size_t i = 1; i < options.argv.size(); ++i) {
        if (options.argv[i] == "--x-inject") {
          ++i;  // an injected fault is for this attempt only
          continue;
        }
        argv.push_back(options.argv[i]);
      }
      argv.insert(argv.end(), {"--previous-failure", desc});
      std::vector<int> inherited;
      for (int fd : {options.control_socket_fd, options.reply_fd, rollback_fd})
        if (fd >= 0) inherited.push_back(fd);
      auto passed = exec_backend->pass_on(luo::ExecRequest{options.rollback_binary, argv, std::nullopt, inherited});
      spdlog::error("the rollback failed too: {}", passed ? "exec returned" : passed.error().describe());
    } else {
      spdlog::error("{}", desc);
    }
    reply_failure(options.reply_fd, options.reply_id, desc);
    if (!session_retrieved) return 1;  // nothing retrieved: nothing to keep
    // Closing a retrieved session finishes it and drops the guest's memory,
    // and so would exiting. Hold it instead, until an operator decides.
    spdlog::error("holding the unfinished LUO session '{}' open in this process (pid {}) so the guest's "
                  "memory is kept; stop this process (SIGTERM) to discard the VM",
                  options.session, ::getpid());
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    int signo = 0;
    sigwait(&stop, &signo);
    return 1;
  };

  if (exec_mode) {
    auto opened = luo::ExecBackend::from_manifest(
        options.manifest_fd, luo::ExecOptions{luo::kvm_vm_factory(common.kvm_device), luo::real_exec_syscalls()});
    if (!opened) return give_up(opened.error());
    backend = std::move(*opened);
  } else {
    auto opened = luo::KernelBackend::open();
    if (!opened) return give_up(opened.error());
    backend = std::move(*opened);
  }
  auto session = backend->retrieve_session(options.session);
  if (!session) return give_up(session.error());
  session_retrieved = true;
  auto retrieved = retrieve_vm(**session, fault);
  if (!retrieved) return give_up(retrieved.error());

  // The guest's clocks move on by the time it spent frozen. CLOCK_MONOTONIC
  // survives an exec but not a kexec, where the wall clock has to do.
  auto& metadata = retrieved->state.metadata;
  const int64_t frozen_ns = exec_mode ? monotonic_ns() - static_cast<int64_t>(metadata.host_monotonic_ns_at_save)
                                      : realtime_ns() - static_cast<int64_t>(metadata.saved_at_realtime_ns);
  advance_clocks(retrieved->state, frozen_ns);
  const bool was_running = metadata.was_running;
  const LiveUpdate::ResumePoint resume_point{retrieved->state.test_device.heartbeat_at_save,
                                             metadata.guest_tsc_at_save, guest_tsc(retrieved->state), was_running};
  record.generation = metadata.generation;

  MachineConfig config;
  apply_console(common, config);
  RestoreInputs inputs{std::move(retrieved->vm_fd), std::move(retrieved->region_files),
                       exec_mode ? memory::SlotKind::userspace : memory::SlotKind::guest_memfd,
                       std::move(retrieved->state)};
  auto machine = Machine::restore(config, std::move(inputs));
  if (!machine) return give_up(machine.error());

  Runtime runtime(std::move(*machine), common, record);
  if (auto served = runtime.serve_socket(common.control_socket, options.control_socket_fd); !served)
    return give_up(served.error());
  if (was_running) {
    if (auto resumed = runtime.machine->resume(); !resumed) return give_up(resumed.error());
  }
  // The blackout ends here: the vCPUs run again (or, paused before, are ready to).
  const int64_t resumed_ns = monotonic_ns();
  if (record.blackout_started_ns > 0) record.blackout_us = (resumed_ns - record.blackout_started_ns) / 1000;
  record.add_phase("restore", steady_clock::now() - restore_started);
  // This process's page tables for guest RAM start empty; filling them
  // now, beside the guest, takes the host fault out of KVM's re-faults.
  runtime.machine->prefault_in_background();
  runtime.update->watch_after_resume(resume_point);

  const auto finish_started = steady_clock::now();
  if (auto finished = (*session)->finish(); !finished)
    spdlog::warn("live update: FINISH failed: {}", finished.error().describe());
  record.add_phase("finish", steady_clock::now() - finish_started);
  json reply;
  if (options.previous_failure.empty()) {
    record.status = "completed";
    record.error.reset();
    record.generation += 1;
    spdlog::info("live update ({}) completed: generation {}, blackout {} us", record.mode, record.generation,
                 record.blackout_us.value_or(-1));
  } else {
    // This process is the rollback: the VM is back, the update did not happen.
    record.status = "failed";
    record.error = options.previous_failure + "; rolled back: the previous vmm restored the VM, which is " +
                   (was_running ? "running" : "paused") + " with its memory intact";
    spdlog::warn("{}", *record.error);
    reply = {{"error", {{"class", control::kGenericError}, {"desc", *record.error}}}};
  }
  runtime.update->record_completed(record);
  // As the record now stands, with the pid and whatever the watchers found.
  if (options.previous_failure.empty()) reply = {{"return", runtime.update->query()}};
  if (options.reply_fd >= 0 && runtime.server) {
    if (!options.reply_id.empty()) reply["id"] = json::parse(options.reply_id, nullptr, false);
    runtime.server->adopt_client(UniqueFd(options.reply_fd), reply);
  }
  return runtime.wait(signals->ref());
}

}  // namespace
}  // namespace vmm

int main(int argc, char** argv) {
  CLI::App app{"vmm: a minimal virtual machine monitor on KVM whose guest memory stays in place\n"
               "across host-kernel live updates and VMM upgrades."};
  app.require_subcommand(1);
  vmm::CommonOptions common;

  vmm::RunOptions run;
  auto* run_command = app.add_subcommand("run", "Launch a VM (by default: the embedded test guest)");
  run_command->add_option("--kernel", run.kernel, "PVH ELF kernel to boot (default: the embedded test guest)");
  run_command->add_option("--cmdline", run.cmdline, "Kernel command line");
  run_command->add_option("--memory", run.memory, "Guest RAM size, e.g. 256M or 2G")->capture_default_str();
  run_command->add_option("--vcpus", run.vcpus, "Number of vCPUs")->capture_default_str();
  run_command->add_option("--shared-memory", run.shared_memory,
                          "Size of the memfd region shared by guest and VMM")->capture_default_str();
  run_command->add_option("--memory-backing", run.backing,
                          "Where guest RAM lives: guest_memfd or memfd (for hosts without "
                          "guest_memfd mmap support)")->capture_default_str();
  run_command->add_option("--name", run.name, "Name of the VM and of its live-update session (default: vm-PID)");

  vmm::RestoreOptions restore;
  auto* restore_command = app.add_subcommand(
      "restore", "Rebuild a VM from a Live Update Orchestrator session after a kexec");
  restore_command->add_option("--session", restore.session, "Name of the LUO session (the VM's name)")->required();
  // The exec handover's own options: passed by `live-update`, not by people.
  restore_command->add_option("--luo-manifest-fd", restore.manifest_fd)->group("");
  restore_command->add_option("--control-socket-fd", restore.control_socket_fd)->group("");
  restore_command->add_option("--reply-fd", restore.reply_fd)->group("");
  restore_command->add_option("--reply-id", restore.reply_id)->group("");
  restore_command->add_option("--update-record", restore.update_record)->group("");
  restore_command->add_option("--rollback-binary", restore.rollback_binary)->group("");
  restore_command->add_option("--previous-failure", restore.previous_failure)->group("");
  restore_command->add_option("--x-inject", restore.inject)->group("");

  int channel_fd = -1;
  auto* transfer_command = app.add_subcommand(
      "transfer-target", "Take a VM over from a running vmm (started by `live-update` in mode transfer)");
  transfer_command->group("");
  transfer_command->add_option("--channel-fd", channel_fd, "The transfer channel from the old vmm")->required();

  for (auto* command : {run_command, restore_command, transfer_command}) {
    command->add_option("--console", common.console, "Serial console output: stdout, none, or a file PATH")
        ->capture_default_str();
    command->add_option("--control-socket", common.control_socket,
                        "Path of the QMP-style control socket (created with mode 0600)");
    command->add_option("--kvm-device", common.kvm_device, "The KVM device")->capture_default_str();
    command->add_option("--log-level", common.log_level, "Log level: trace, debug, info, warn, error, critical, off")
        ->capture_default_str();
  }

  CLI11_PARSE(app, argc, argv);
  run.kernel_given = run_command->count("--kernel") > 0;
  run.control_socket_given = run_command->count("--control-socket") > 0;
  run.name_given = run_command->count("--name") > 0;

  // Logs go to stderr: stdout belongs to the guest console.
  spdlog::set_default_logger(spdlog::stderr_color_mt("vmm"));
  spdlog::set_pattern("[%H:%M:%S.%e] vmm %^%l%$: %v");
  const auto level = spdlog::level::from_str(common.log_level);
  if (level == spdlog::level::off && common.log_level != "off") {
    spdlog::error("--log-level '{}' is not one of: trace, debug, info, warn, error, critical, off", common.log_level);
    return 2;
  }
  spdlog::set_level(level);

  if (run_command->parsed()) return vmm::run_vm(common, run);
  if (transfer_command->parsed()) return vmm::take_over_vm(common, channel_fd);
  if (restore_command->parsed()) {
    restore.argv.assign(argv, argv + argc);
    return vmm::restore_vm(common, restore);
  }
  return 2;
}

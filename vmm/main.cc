// vmm: a minimal VMM on KVM whose guest memory never moves during live updates.
//
//   vmm run ...            launch a VM
//   vmm restore ...        rebuild a VM from a LUO session: after a kexec (by
//                          hand or from a systemd unit), or started by
//                          `live-update` in exec mode (`--handover-fd N`)
//   vmm transfer-target    the new process of a transfer live update
//   vmm handover-info      the handover formats this binary speaks (JSON)
//   vmm agent              the LUO session agent: the host's one owner of
//                          /dev/liveupdate, handing sessions to the vmms
#include <fcntl.h>
#include <signal.h>
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

#include "luo/session.h"
#include "base/size.h"
#include "machine/machine.h"
#include "update/arrival.h"
#include "update/fd_store.h"
#include "update/faults.h"
#include "update/handover_record.h"
#include "update/luo_agent.h"
#include "update/session_source.h"
#include "update/versions.h"
#include "vmm/runtime.h"

namespace vmm {
namespace {

using nlohmann::json;

// Options every subcommand takes.
struct CommonOptions {
  std::string console = "stdout";
  std::string control_socket;
  std::string kvm_device = "/dev/kvm";
  std::string log_level = "info";
  std::string on_sigterm = "stop";
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

LaunchOptions launch_options(const CommonOptions& common) {
  return LaunchOptions{common.control_socket, common.console, common.log_level, common.kvm_device, common.on_sigterm};
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
  if (common.on_sigterm == "fd-store") {
    // The next start finds the VM's files by its name, and systemd's fd
    // store carries memfds only.
    if (!options.name_given)
      return fail("--on-sigterm fd-store needs --name: the service's next start finds the VM in the fd store by "
                  "its name");
    if (options.backing != "memfd")
      return fail("--on-sigterm fd-store needs --memory-backing memfd: systemd's fd store carries memfds across a "
                  "kexec, not a guest_memfd");
  }

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
  apply_launch(launch_options(common), config);
  return config;
}

// The new side of every live-update mode ends in the same completion.
int arrive(std::variant<Arrival, int> arrived, FdRef signals) {
  if (auto* status = std::get_if<int>(&arrived)) return *status;
  return complete(std::move(std::get<Arrival>(arrived)), signals);
}

int run_vm(const CommonOptions& common, const RunOptions& options) {
  auto signals = shutdown_signals();
  if (!signals) {
    spdlog::error("{}", signals.error().describe());
    return 1;
  }
  // Started by systemd with this VM's files in its fd store (put there by
  // the previous start's SIGTERM, before a restart or a `systemctl kexec`):
  // restore the VM instead of booting a new one.
  if (options.name_given && std::getenv("LISTEN_FDS")) {
    std::shared_ptr<FdStoreBackend> stored = FdStoreBackend::from_environment();
    if (stored->has_session(options.name)) {
      if (auto checked = check_run_options(common, options); !checked) {
        spdlog::error("{}", checked.error().describe());
        return 2;
      }
      spdlog::info("VM '{}': its files are in the service's fd store; restoring it instead of booting", options.name);
      LuoArrivalOptions restore;
      restore.session = options.name;
      restore.launch = launch_options(common);
      restore.fd_store = std::move(stored);
      return arrive(arrive_by_luo(restore), signals->ref());
    }
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
  Runtime runtime(std::move(*machine), launch_options(common), UpdateRecord{});
  if (auto served = runtime.serve_socket(UniqueFd()); !served) {
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

// A command line this binary cannot parse, from an older or newer vmm's exec
// handover: roll back to the binary that started the update, which can.
int roll_back_unparsed(int argc, char** argv, const std::string& why) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--handover-fd") != 0) continue;
    const int fd = std::atoi(argv[i + 1]);
    auto bytes = read_handover_memfd(FdRef(fd));
    const auto rollback = bytes ? rollback_fd_of(*bytes) : std::nullopt;
    bool is_rollback = false;
    for (int j = 1; j < argc; ++j) is_rollback |= std::strcmp(argv[j], "--previous-failure") == 0;
    if (!rollback || is_rollback) break;
    Error failed = roll_back(fd, *rollback, {}, "live update failed: the new vmm cannot parse its command line (" + why + ")");
    spdlog::error("{}", failed.describe());
    return 1;
  }
  return 2;
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

  vmm::LuoArrivalOptions restore;
  auto* restore_command = app.add_subcommand(
      "restore", "Rebuild a VM from a Live Update Orchestrator session after a kexec");
  auto* session_option =
      restore_command->add_option("--session", restore.session, "Name of the LUO session (the VM's name)");
  // The exec handover's own options: passed by `live-update`, not by people.
  // `--handover-fd N` is the whole interface between versions: everything
  // else is in the versioned record it names.
  auto* handover_option = restore_command->add_option("--handover-fd", restore.handover_fd)->group("");
  restore_command->add_option("--previous-failure", restore.previous_failure)->group("");
  restore_command->add_option("--luo-manifest-fd", restore.luo_manifest_fd)->group("");
  session_option->excludes(handover_option);
  // A test build's fault for the restore (the kexec lab's failed restores).
  std::string restore_fault;
  if (vmm::fault_injection_built())
    restore_command->add_option("--x-inject", restore_fault, "Test builds only: a fault for this restore")
        ->group("");
  bool discard = false;
  restore_command
      ->add_flag("--discard", discard,
                 "Finish the session without restoring (from the kernel, or from the holders a failed restore "
                 "left): the guest's memory is released")
      ->needs(session_option);

  vmm::TransferArrivalOptions transfer;
  auto* transfer_command = app.add_subcommand(
      "transfer-target", "Take a VM over from a running vmm (started by `live-update` in mode transfer)");
  transfer_command->group("");
  transfer_command->add_option("--channel-fd", transfer.channel_fd, "The transfer channel from the old vmm")
      ->required();

  auto* info_command = app.add_subcommand("handover-info", "Print the handover formats this binary speaks (JSON)");
  info_command->group("");

  vmm::LuoAgentOptions agent;
  auto* agent_command = app.add_subcommand(
      "agent", "Run the LUO session agent: open /dev/liveupdate once and hand its sessions to the vmms of this host");
  agent_command->add_option("--socket", agent.socket, "Path of the agent's socket (created with mode 0600)")
      ->capture_default_str();
  agent_command->add_option("--device", agent.device, "The Live Update Orchestrator device")->capture_default_str();
  agent_command->add_flag("--restore-vms", agent.restore_vms,
                          "After a kexec: start `vmm restore` for every VM of the registry the previous kernel's "
                          "agent sealed (seal-registry)");
  agent_command->add_option("--vmm", agent.restore.vmm, "The vmm binary the restores run (default: this one)")
      ->capture_default_str();
  agent_command->add_option("--restore-log-dir", agent.restore.log_dir,
                            "Directory of the restores' logs (NAME.restore.log: their stdout and stderr)")
      ->capture_default_str();
  agent_command->add_option("--log-level", common.log_level, "Log level: trace, debug, info, warn, error, critical, off")
      ->capture_default_str();

  // Where kexec updates and `vmm restore` get their LUO sessions. Put in the
  // environment, so that a vmm started by an exec or transfer update, or
  // its rollback, asks the same agent.
  std::string luo_agent;
  for (auto* command : {run_command, restore_command}) {
    command->add_option("--luo-agent", luo_agent,
                        fmt::format("Get LUO sessions from the agent at PATH (`vmm agent`); default: ${} or {} when "
                                    "it exists, else /dev/liveupdate directly",
                                    vmm::kLuoAgentEnvironment, vmm::kDefaultLuoAgentSocket));
  }

  for (auto* command : {run_command, restore_command, transfer_command}) {
    command->add_option("--console", common.console, "Serial console output: stdout, none, or a file PATH")
        ->capture_default_str();
    command->add_option("--control-socket", common.control_socket,
                        "Path of the QMP-style control socket (created with mode 0600)");
    command->add_option("--kvm-device", common.kvm_device, "The KVM device")->capture_default_str();
    command->add_option("--on-sigterm", common.on_sigterm,
                        "What SIGTERM does: stop (the VM ends with the vmm) or fd-store (a systemd service keeps the "
                        "VM in its fd store, for its next start, after a restart or a `systemctl kexec`)")
        ->check(CLI::IsMember({"stop", "fd-store"}))
        ->capture_default_str();
    command->add_option("--log-level", common.log_level, "Log level: trace, debug, info, warn, error, critical, off")
        ->capture_default_str();
  }

  // A closed pipe (stdout to `head`, a client gone) is an error to report,
  // never a reason to kill the vmm and its guest.
  ::signal(SIGPIPE, SIG_IGN);
  // Logs go to stderr: stdout belongs to the guest console.
  spdlog::set_default_logger(spdlog::stderr_color_mt("vmm"));
  spdlog::set_pattern("[%H:%M:%S.%e] vmm %^%l%$: %v");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    if (error.get_exit_code() != 0) {
      if (int status = vmm::roll_back_unparsed(argc, argv, error.what()); status != 2) return status;
    }
    return app.exit(error);
  }
  run.kernel_given = run_command->count("--kernel") > 0;
  run.control_socket_given = run_command->count("--control-socket") > 0;
  run.name_given = run_command->count("--name") > 0;

  const auto level = spdlog::level::from_str(common.log_level);
  if (level == spdlog::level::off && common.log_level != "off") {
    spdlog::error("--log-level '{}' is not one of: trace, debug, info, warn, error, critical, off", common.log_level);
    return 2;
  }
  spdlog::set_level(level);

  if (info_command->parsed()) {
    std::puts(vmm::this_binary_versions().to_json().dump().c_str());
    return 0;
  }
  if (!luo_agent.empty()) ::setenv(vmm::kLuoAgentEnvironment, luo_agent.c_str(), 1);
  if (run_command->parsed()) return vmm::run_vm(common, run);
  auto signals = vmm::shutdown_signals();
  if (!signals) {
    spdlog::error("{}", signals.error().describe());
    return 1;
  }
  if (agent_command->parsed()) return vmm::run_luo_agent(agent, signals->ref());
  if (transfer_command->parsed()) {
    transfer.launch = vmm::launch_options(common);
    return vmm::arrive(vmm::arrive_by_transfer(transfer), signals->ref());
  }
  if (restore_command->parsed()) {
    if (restore.session.empty() && restore.handover_fd < 0) {
      spdlog::error("vmm restore needs --session NAME: the LUO session (the VM's name) to rebuild the VM from");
      return 2;
    }
    if (discard) return vmm::discard_luo_session(restore.session);
    if (!restore_fault.empty()) {
      auto fault = vmm::fault_from_string(restore_fault);
      if (!fault) {
        spdlog::error("vmm restore --x-inject: {}", fault.error().describe());
        return 2;
      }
      restore.fault = *fault;
    }
    restore.launch = vmm::launch_options(common);
    return vmm::arrive(vmm::arrive_by_luo(restore), signals->ref());
  }
  return 2;
}

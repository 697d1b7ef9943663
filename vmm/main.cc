// vmm: a minimal VMM on KVM whose guest memory never moves during live updates.
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "vmm/commands.h"
#include "vmm/control/server.h"
#include "vmm/machine.h"
#include "vmm/size.h"

namespace vmm {
namespace {

struct RunOptions {
  std::string memory = "256M";
  std::string shared_memory = "16M";
  uint32_t vcpus = 1;
  std::string backing = "guest_memfd";
  std::string kernel;
  std::string cmdline;
  std::string console = "stdout";
  std::string control_socket;
  std::string name;
  std::string kvm_device = "/dev/kvm";
};

Result<MachineConfig> machine_config(const RunOptions& options) {
  MachineConfig config;
  config.name = options.name.empty() ? "vm-" + std::to_string(::getpid()) : options.name;
  VMM_TRY_ASSIGN(ram, parse_size(options.memory, "--memory"));
  VMM_TRY_ASSIGN(shared, parse_size(options.shared_memory, "--shared-memory"));
  config.ram_size = ram;
  config.shared_size = shared;
  config.vcpus = options.vcpus;
  auto backing = memory::backing_from_string(options.backing);
  if (!backing)
    return fail("--memory-backing '" + options.backing + "' is not one of: guest_memfd, memfd");
  config.ram_backing = *backing;
  if (!options.kernel.empty()) config.kernel_path = options.kernel;
  config.cmdline = options.cmdline;
  config.kvm_path = options.kvm_device;
  if (options.console == "stdout") {
    config.console = ConsoleKind::stdout_console;
  } else if (options.console == "none") {
    config.console = ConsoleKind::none;
  } else {
    config.console = ConsoleKind::file;
    config.console_path = options.console;
  }
  return config;
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

int run_vm(const RunOptions& options) {
  auto signals = shutdown_signals();
  if (!signals) {
    spdlog::error("{}", signals.error().describe());
    return 1;
  }
  auto config = machine_config(options);
  if (!config) {
    spdlog::error("{}", config.error().describe());
    return 2;
  }
  auto machine = Machine::create(*config);
  if (!machine) {
    spdlog::error("{}", machine.error().describe());
    return 1;
  }
  MachineCommands commands(**machine);
  std::unique_ptr<control::Server> server;
  if (!options.control_socket.empty()) {
    auto listening = control::Server::listen(options.control_socket, commands);
    if (!listening) {
      spdlog::error("{}", listening.error().describe());
      return 1;
    }
    server = std::move(*listening);
    (*machine)->set_event_sink([&server](const std::string& name, const nlohmann::json& data) {
      server->emit_event(name, data);
    });
  }
  if (auto started = (*machine)->start(); !started) {
    spdlog::error("{}", started.error().describe());
    return 1;
  }
  const MachineConfig& running = (*machine)->config();
  spdlog::info("VM '{}' running: {} RAM in {}, {} shared, {} vCPU(s){}", running.name,
               format_size(running.ram_size), memory::to_string(running.ram_backing),
               format_size(running.shared_size), running.vcpus,
               options.control_socket.empty() ? "" : ", control socket " + options.control_socket);
  wait_for_shutdown(**machine, signals->ref());
  (*machine)->stop();
  if (server) server->stop();
  (*machine)->set_event_sink({});
  return (*machine)->shutdown_failed() ? 1 : 0;
}

}  // namespace
}  // namespace vmm

int main(int argc, char** argv) {
  using vmm::RunOptions;
  CLI::App app{"vmm: a minimal virtual machine monitor on KVM whose guest memory stays in place\n"
               "across host-kernel live updates and VMM upgrades."};
  app.require_subcommand(1);
  std::string log_level = "info";

  RunOptions run;
  auto* run_command = app.add_subcommand("run", "Launch a VM (by default: the embedded test guest)");
  run_command->add_option("--kernel", run.kernel,
                          "PVH ELF kernel to boot (default: the embedded test guest)");
  run_command->add_option("--cmdline", run.cmdline, "Kernel command line");
  run_command->add_option("--memory", run.memory, "Guest RAM size, e.g. 256M or 2G")->capture_default_str();
  run_command->add_option("--vcpus", run.vcpus, "Number of vCPUs")->capture_default_str();
  run_command->add_option("--shared-memory", run.shared_memory,
                          "Size of the memfd region shared by guest and VMM")->capture_default_str();
  run_command->add_option("--memory-backing", run.backing,
                          "Where guest RAM lives: guest_memfd or memfd (for hosts without "
                          "guest_memfd mmap support)")->capture_default_str();
  run_command->add_option("--console", run.console,
                          "Serial console output: stdout, none, or a file PATH")->capture_default_str();
  run_command->add_option("--control-socket", run.control_socket,
                          "Path of the QMP-style control socket (created with mode 0600)");
  run_command->add_option("--name", run.name, "Name of the VM (default: vm-PID)");
  run_command->add_option("--kvm-device", run.kvm_device, "The KVM device to use")->capture_default_str();
  for (auto* command : {run_command})
    command->add_option("--log-level", log_level,
                        "Log level: trace, debug, info, warn, error, critical, off")
        ->capture_default_str();

  CLI11_PARSE(app, argc, argv);

  // Logs go to stderr: stdout belongs to the guest console.
  spdlog::set_default_logger(spdlog::stderr_color_mt("vmm"));
  spdlog::set_pattern("[%H:%M:%S.%e] vmm %^%l%$: %v");
  const auto level = spdlog::level::from_str(log_level);
  if (level == spdlog::level::off && log_level != "off") {
    spdlog::error("--log-level '{}' is not one of: trace, debug, info, warn, error, critical, off", log_level);
    return 2;
  }
  spdlog::set_level(level);

  if (run_command->parsed()) return vmm::run_vm(run);
  return 2;
}

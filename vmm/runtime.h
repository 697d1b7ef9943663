// A VM's life in this process once it is built: the control socket, the
// main loop, the shutdown. And the one path every live-update mode's new
// side ends in (complete): serve the socket, commit, resume, report, reply.
#pragma once

#include <memory>
#include <string>

#include "base/result.h"
#include "base/unique_fd.h"
#include "machine/machine.h"
#include "update/arrival.h"
#include "update/live_update.h"
#include "vmm/commands.h"
#include "vmm/control/server.h"

namespace vmm {

// Blocks SIGINT/SIGTERM in every thread (threads inherit the mask) and
// returns a signalfd the main loop polls for them.
[[nodiscard]] Result<UniqueFd> shutdown_signals();

struct Runtime {
  std::unique_ptr<Machine> machine;
  std::unique_ptr<LiveUpdate> update;
  std::unique_ptr<MachineCommands> commands;
  std::unique_ptr<control::Server> server;
  LaunchOptions launch;

  Runtime(std::unique_ptr<Machine> built, LaunchOptions launch_options, UpdateRecord record);
  ~Runtime();

  // Serves the control socket at launch.control_socket_path: a new one, or
  // the listening socket a previous vmm handed over.
  [[nodiscard]] Result<void> serve_socket(UniqueFd inherited);
  // Until a signal or the machine asks to shut down; returns the exit status.
  int wait(FdRef signals);
};

// The new side's completion, for every mode: returns the exit status.
int complete(Arrival arrival, FdRef signals);

}  // namespace vmm

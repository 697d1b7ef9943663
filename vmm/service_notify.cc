#include "vmm/service_notify.h"

#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace vmm {
namespace {

void notify(const std::string& state) {
  // unset_environment=0: a vmm that execs itself (an exec update) tells
  // systemd again from the new binary.
  const int sent = ::sd_notify(0, state.c_str());
  if (sent < 0) {
    spdlog::warn("service manager: cannot send '{}': {}", state, std::strerror(-sent));
  } else if (sent > 0) {
    std::string shown = state;
    for (char& c : shown)
      if (c == '\n') c = ' ';
    spdlog::debug("service manager: sent {}", shown);
  }
}

}  // namespace

void notify_ready(const std::string& vm_name) {
  notify(fmt::format("READY=1\nMAINPID={}\nSTATUS=VM {} running", ::getpid(), vm_name));
}

void notify_main_pid(pid_t successor) {
  notify(fmt::format("MAINPID={}\nSTATUS=the VM moved to pid {}", successor, successor));
}

void notify_stopping(const std::string& reason) { notify(fmt::format("STOPPING=1\nSTATUS=stopping: {}", reason)); }

}  // namespace vmm

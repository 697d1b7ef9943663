// `vmmctl host-update`: one host kernel live update for every vmm on the
// host, and `vmmctl host-report`: how each VM came back.
//
// The coordinator finds every vmm by its control socket in one directory,
// starts a coordinated kexec update in each (live-update {"mode": "kexec",
// "coordinated": true}, which prepares with the guest running and waits),
// waits until every one has prepared, loads the new kernel once, lets every
// VM freeze (live-update-continue), waits until every one is frozen, and
// only then kexecs. Any VM that fails, or does not get there before its
// deadline, cancels the whole upgrade: every VM is told live-update-cancel
// and resumes untouched, and the kernel is unloaded. docs/host-update.md
// describes the flow and what happens on each failure.
#pragma once

#include <chrono>
#include <ostream>
#include <string>

namespace vmm::tools {

struct HostUpdateOptions {
  std::string kernel;
  std::string initrd;              // empty: none
  std::string cmdline;             // empty: the running kernel's
  std::string socket_dir = "/run/vmm";
  std::string agent_socket;        // empty: the default agent socket, when one answers there
  std::chrono::milliseconds prepare_timeout{std::chrono::minutes(5)};
  std::chrono::milliseconds freeze_timeout{std::chrono::seconds(30)};
};

// Returns the exit status: it returns at all only when the upgrade was
// cancelled (1) or could not start (2); on success the host kexecs.
// Progress goes to the log; `out` gets one JSON line with the outcome.
[[nodiscard]] int run_host_update(const HostUpdateOptions& options, std::ostream& out);

// After the new kernel is up: every vmm in `socket_dir` with its last
// update (generation, status, blackout, guest gap) and the longest
// blackout, as one JSON document. Exit status 0 when every VM answered and
// completed its update, 1 otherwise.
[[nodiscard]] int run_host_report(const std::string& socket_dir, std::ostream& out);

}  // namespace vmm::tools

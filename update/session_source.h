// Where a kexec update (and its probe) and `vmm restore` get their LUO
// sessions: from the LUO session agent when one answers (update/luo_agent.h),
// else from /dev/liveupdate, opened by this process alone, as before there
// was an agent.
//
// The agent's socket is the environment's VMM_LUO_AGENT (`--luo-agent PATH`
// sets it, so it also reaches a new vmm after an exec update), else
// kDefaultLuoAgentSocket when that exists. A socket named explicitly must
// answer; the default one that does not (a stale file) is passed over with a
// warning.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/result.h"
#include "luo/kernel_backend.h"
#include "luo/session.h"
#include "update/handover_record.h"

namespace vmm {

inline constexpr const char* kLuoAgentEnvironment = "VMM_LUO_AGENT";

struct SessionSourceOptions {
  std::string agent_socket;     // empty: no agent, the device only
  bool agent_required = false;  // named explicitly: an agent that does not answer is an error
  std::string device = luo::kLiveUpdateDevice;
  luo::KernelSyscalls syscalls = luo::real_kernel_syscalls();
  // With an agent: what its registry runs after the kexec to restore the
  // sessions created through this source (AgentBackend::set_restore_args).
  // The device has no registry and ignores it.
  std::optional<std::vector<std::string>> restore_args;
};

// `vmm restore`'s arguments for a VM launched with `launch`, besides
// --session and --luo-agent: --control-socket, --console, --log-level,
// --kvm-device, relative paths made absolute (the agent runs elsewhere).
[[nodiscard]] std::vector<std::string> restore_arguments(const LaunchOptions& launch);

// From the environment (see above). `default_socket` is for tests.
[[nodiscard]] SessionSourceOptions session_source_options(const std::string& default_socket = "");

struct SessionSource {
  std::unique_ptr<luo::Backend> backend;
  std::string kind;   // "agent" | "device": for logs and query-live-update
  std::string where;  // the agent's socket or the device's path
};

// The agent, or the device (waiting up to `busy_wait` while another vmm
// holds it, as open_liveupdate does). Logs which one.
[[nodiscard]] Result<SessionSource> open_session_source(const SessionSourceOptions& options,
                                                        const std::atomic<bool>* cancelled = nullptr,
                                                        std::chrono::milliseconds busy_wait = std::chrono::seconds(10));

// Which source open_session_source would use now, without opening the
// device: "agent" when an agent answers, else "device".
[[nodiscard]] std::string probe_session_source_kind(const SessionSourceOptions& options);

}  // namespace vmm

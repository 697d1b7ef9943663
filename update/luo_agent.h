// The LUO session agent (`vmm agent`): the one process on the host that
// opens /dev/liveupdate, and the owner of every session it hands out.
//
// /dev/liveupdate is single-open and a session lives exactly as long as some
// descriptor of it: the kernel unpreserves an outgoing session whose last fd
// closes, and finishes an incoming one (dropping every file not retrieved).
// So the agent creates and retrieves sessions for the vmms, keeps its own
// descriptor of each, and gives every client a duplicate over the socket
// (SCM_RIGHTS). A vmm that crashes, or whose restore fails, loses nothing:
// the session stays with the agent until a vmm says it is done
// (release-session). The kernel lets each incoming session be retrieved
// once; the agent retrieves it once and hands out duplicates of that one, so
// a failed `vmm restore` can simply be run again.
//
// The protocol is the control socket's (QMP-shaped JSON lines, vmm/control),
// served by control::Server; see docs/live-update.md, "The LUO session agent".
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "luo/kernel_backend.h"
#include "luo/session.h"
#include "update/luo_registry.h"
#include "vmm/control/handler.h"

namespace vmm {
namespace control {
class Server;
}

inline constexpr const char* kDefaultLuoAgentSocket = "/run/vmm/luo-agent.sock";
// The agent's protocol: in its greeting and checked by `hello`. A client
// and an agent of different protocol versions refuse each other.
inline constexpr int kLuoAgentProtocol = 1;
// Optional features within protocol 1, listed in hello's reply: a client
// uses one only when its agent lists it. "restore-args": create-session
// takes "restore"; "registry": seal-registry, unseal-registry, list-restores.
inline constexpr const char* kLuoAgentFeatureRestoreArgs = "restore-args";
inline constexpr const char* kLuoAgentFeatureRegistry = "registry";

// The greeting's "version" member: the package's version plus
// {"luo-agent": {"protocol": kLuoAgentProtocol}}.
[[nodiscard]] nlohmann::json luo_agent_version();

// How the agent brings the VMs of its registry back after a kexec
// (`vmm agent --restore-vms`): one `vmm restore` child per entry.
struct RestoreVmsOptions {
  // The binary run as `vmm restore`; /proc/self/exe is the agent's own (the
  // very file it runs, even if a package upgrade replaced the path since).
  std::string vmm = "/proc/self/exe";
  std::string agent_socket = kDefaultLuoAgentSocket;  // passed as --luo-agent
  std::string log_dir = "/run/vmm";                   // NAME.restore.log, stdout and stderr
  // Starts `argv` with stdout and stderr on `log` and returns its pid;
  // empty: posix_spawn. Tests put a recorder here.
  std::function<Result<pid_t>(const std::vector<std::string>& argv, FdRef log)> spawn;
};

class LuoAgent final : public control::CommandHandler {
 public:
  // Opens `device` once, for the agent's whole life.
  [[nodiscard]] static Result<std::unique_ptr<LuoAgent>> open(
      const std::string& device = luo::kLiveUpdateDevice, luo::KernelSyscalls syscalls = luo::real_kernel_syscalls());

  // Commands (docs/luo-agent.md): hello, create-session, retrieve-session,
  // release-session, list-sessions, seal-registry, unseal-registry,
  // list-restores. Every failure is an error reply.
  control::CommandResult execute(const std::string& command, const nlohmann::json& arguments) override;
  control::CommandResult execute(const std::string& command, const nlohmann::json& arguments,
                                 const control::CommandContext& context) override;

  // What list-sessions returns.
  [[nodiscard]] nlohmann::json list() const;
  [[nodiscard]] size_t held_sessions() const;

  // After a kexec: retrieves the previous agent's registry session, reads
  // the registry, finishes that session and starts one `vmm restore` per
  // entry. Never fails the agent: no registry is logged and nothing is
  // started; an unusable one is logged and its session kept held
  // (list-sessions' "registry"). Returns how many restores were started.
  size_t restore_vms(const RestoreVmsOptions& options);
  // Collects the exit status of restores that ended (waitpid, WNOHANG).
  void reap_restores();
  [[nodiscard]] bool restores_running() const;
  // What list-restores returns.
  [[nodiscard]] nlohmann::json list_restores();

 private:
  struct Held {
    std::unique_ptr<luo::Session> session;  // a luo::KernelSession
    std::chrono::system_clock::time_point since;
    pid_t last_client = 0;
    uint64_t handed_out = 0;  // duplicates given so far
    // What `vmm restore` needs besides --session after the kexec
    // (create-session's "restore"); nullopt when the client gave none.
    std::optional<std::vector<std::string>> restore_args;
  };
  // The agent's own session carrying the registry: outgoing once sealed,
  // or the previous kernel's that could not be used (kept for an operator).
  struct RegistrySession {
    std::unique_ptr<luo::Session> session;
    std::vector<std::string> names;  // outgoing: the sessions sealed in it
    std::chrono::system_clock::time_point since;
    std::string error;  // incoming: why nothing was restored from it
  };
  struct Restore {
    std::string name;
    std::vector<std::string> argv;
    std::string log;
    pid_t pid = 0;  // 0: it did not start
    std::string state;  // running | exited | killed | not-started | unknown
    int status = 0;     // exited: the exit status; killed: the signal
    std::string error;  // not-started, unknown: why
  };

  LuoAgent(std::unique_ptr<luo::KernelBackend> device, std::string device_path)
      : device_(std::move(device)), device_path_(std::move(device_path)) {}

  control::CommandResult hand_out(Held& held, const control::CommandContext& context);
  control::CommandResult create(const std::string& name, std::optional<std::vector<std::string>> restore_args,
                                const control::CommandContext& context);
  control::CommandResult retrieve(const std::string& name, const control::CommandContext& context);
  control::CommandResult release(const std::string& name, const control::CommandContext& context);
  control::CommandResult create_command(const nlohmann::json& arguments, const control::CommandContext& context);
  control::CommandResult seal_registry(const control::CommandContext& context);
  control::CommandResult unseal_registry(const control::CommandContext& context);
  [[nodiscard]] nlohmann::json describe_locked(const std::string& name, const Held& held) const;
  [[nodiscard]] nlohmann::json describe_registry_locked() const;
  void start_restore(const RegistryEntry& entry, const RestoreVmsOptions& options);

  mutable std::mutex mutex_;  // clients run on their own threads
  std::unique_ptr<luo::KernelBackend> device_;
  std::string device_path_;
  std::map<std::string, Held> sessions_;
  std::optional<RegistrySession> registry_;
  std::vector<Restore> restores_;
};

// Serves `agent` on a new socket at `path` with the agent's options (its
// greeting, a request line of at most kMaxLuoAgentRequestBytes).
inline constexpr size_t kMaxLuoAgentRequestBytes = 4096;  // a request names one session
[[nodiscard]] Result<std::unique_ptr<control::Server>> listen_luo_agent(const std::string& path, LuoAgent& agent);

struct LuoAgentOptions {
  std::string socket = kDefaultLuoAgentSocket;
  std::string device = luo::kLiveUpdateDevice;
  // --restore-vms: once serving, restore the VMs of the previous kernel's
  // registry (restore.agent_socket is set to `socket`).
  bool restore_vms = false;
  RestoreVmsOptions restore;
};

// `vmm agent`: opens the device, serves `options.socket` until
// SIGINT/SIGTERM (blocked by the caller and read from `signals`), reaping
// the restores it started. Returns the exit status.
[[nodiscard]] int run_luo_agent(const LuoAgentOptions& options, FdRef signals);

}  // namespace vmm

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
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "luo/kernel_backend.h"
#include "luo/session.h"
#include "vmm/control/handler.h"

namespace vmm {
namespace control {
class Server;
}

inline constexpr const char* kDefaultLuoAgentSocket = "/run/vmm/luo-agent.sock";
// The agent's protocol: in its greeting and checked by `hello`. A client
// and an agent of different protocol versions refuse each other.
inline constexpr int kLuoAgentProtocol = 1;

// The greeting's "version" member: the package's version plus
// {"luo-agent": {"protocol": kLuoAgentProtocol}}.
[[nodiscard]] nlohmann::json luo_agent_version();

class LuoAgent final : public control::CommandHandler {
 public:
  // Opens `device` once, for the agent's whole life.
  [[nodiscard]] static Result<std::unique_ptr<LuoAgent>> open(
      const std::string& device = luo::kLiveUpdateDevice, luo::KernelSyscalls syscalls = luo::real_kernel_syscalls());

  // Commands (docs/live-update.md): hello, create-session, retrieve-session,
  // release-session, list-sessions. Every failure is an error reply.
  control::CommandResult execute(const std::string& command, const nlohmann::json& arguments) override;
  control::CommandResult execute(const std::string& command, const nlohmann::json& arguments,
                                 const control::CommandContext& context) override;

  // What list-sessions returns.
  [[nodiscard]] nlohmann::json list() const;
  [[nodiscard]] size_t held_sessions() const;

 private:
  struct Held {
    std::unique_ptr<luo::Session> session;  // a luo::KernelSession
    std::chrono::system_clock::time_point since;
    pid_t last_client = 0;
    uint64_t handed_out = 0;  // duplicates given so far
  };

  LuoAgent(std::unique_ptr<luo::KernelBackend> device, std::string device_path)
      : device_(std::move(device)), device_path_(std::move(device_path)) {}

  control::CommandResult hand_out(Held& held, const control::CommandContext& context);
  control::CommandResult create(const std::string& name, const control::CommandContext& context);
  control::CommandResult retrieve(const std::string& name, const control::CommandContext& context);
  control::CommandResult release(const std::string& name, const control::CommandContext& context);
  [[nodiscard]] nlohmann::json describe_locked(const std::string& name, const Held& held) const;

  mutable std::mutex mutex_;  // clients run on their own threads
  std::unique_ptr<luo::KernelBackend> device_;
  std::string device_path_;
  std::map<std::string, Held> sessions_;
};

// Serves `agent` on a new socket at `path` with the agent's options (its
// greeting, a request line of at most kMaxLuoAgentRequestBytes).
inline constexpr size_t kMaxLuoAgentRequestBytes = 4096;  // a request names one session
[[nodiscard]] Result<std::unique_ptr<control::Server>> listen_luo_agent(const std::string& path, LuoAgent& agent);

// `vmm agent`: opens the device, serves `socket_path` until SIGINT/SIGTERM
// (blocked by the caller and read from `signals`). Returns the exit status.
[[nodiscard]] int run_luo_agent(const std::string& socket_path, const std::string& device, FdRef signals);

}  // namespace vmm

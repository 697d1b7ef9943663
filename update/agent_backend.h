// A luo::Backend whose sessions come from the LUO session agent (`vmm agent`,
// update/luo_agent.h) instead of this process's own /dev/liveupdate.
//
// The agent creates or retrieves the session and sends a duplicate of its
// descriptor; the session's own ioctls (preserve, retrieve, finish) go from
// here straight to the kernel through a luo::KernelSession, as they do with
// the device. What changes is who else holds the session:
//   - an outgoing session destroyed before the kexec is cancelled: the
//     session tells the agent to release it (otherwise the agent's reference
//     would carry it across the kexec);
//   - an incoming session is released once finish() succeeds; destroyed
//     unfinished (a failed restore) it stays with the agent, so the next
//     `vmm restore` gets it again.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "luo/kernel_backend.h"
#include "luo/session.h"
#include "vmm/control/client.h"

namespace vmm {

// The connection to the agent, shared by the backend and every session it
// made: a session outlives its backend (the kexec handover drops the backend
// once the session is made) and still has to release itself.
class AgentConnection {
 public:
  // Connects, reads the greeting, negotiates and says hello with this
  // build's protocol. ECONNREFUSED/ENOENT when nothing answers at `path`;
  // EPROTO when the agent speaks another protocol.
  [[nodiscard]] static Result<std::shared_ptr<AgentConnection>> connect(
      const std::string& path, std::chrono::milliseconds timeout = std::chrono::seconds(10));

  // One command. Transport failures and the agent's error replies are both
  // errors here (the agent's text, which names cause and fix); `fds`
  // receives the descriptors the reply carried.
  [[nodiscard]] Result<nlohmann::json> call(const std::string& command, const nlohmann::json& arguments,
                                            std::vector<UniqueFd>* fds = nullptr);

  [[nodiscard]] const std::string& path() const { return path_; }
  [[nodiscard]] pid_t agent_pid() const { return agent_pid_; }
  // Whether hello's reply listed `feature` (kLuoAgentFeature*).
  [[nodiscard]] bool has_feature(std::string_view feature) const;

 private:
  AgentConnection(control::Client client, std::string path) : client_(std::move(client)), path_(std::move(path)) {}
  std::mutex mutex_;  // one request at a time on the connection
  control::Client client_;
  std::string path_;
  pid_t agent_pid_ = 0;
  std::vector<std::string> features_;
};

class AgentBackend final : public luo::Backend {
 public:
  // `syscalls`: what the received sessions' ioctls go through (a fake
  // kernel in tests).
  [[nodiscard]] static Result<std::unique_ptr<AgentBackend>> connect(
      const std::string& path, luo::KernelSyscalls syscalls = luo::real_kernel_syscalls());

  [[nodiscard]] std::string_view kind() const override { return "agent"; }
  [[nodiscard]] Result<std::unique_ptr<luo::Session>> create_session(std::string_view name) override;
  [[nodiscard]] Result<std::unique_ptr<luo::Session>> retrieve_session(std::string_view name) override;

  // What the agent should run after the kexec to restore the sessions this
  // backend creates from now on (create-session's "restore": `vmm restore`'s
  // arguments besides --session and --luo-agent). Unset: none is sent, and
  // an agent's registry restores the VM with the defaults.
  void set_restore_args(std::vector<std::string> args) { restore_args_ = std::move(args); }

  // The agent drops its reference to `name` (release-session).
  [[nodiscard]] Result<void> release_session(std::string_view name);
  [[nodiscard]] Result<nlohmann::json> list_sessions();
  [[nodiscard]] AgentConnection& connection() { return *connection_; }

 private:
  AgentBackend(std::shared_ptr<AgentConnection> connection, luo::KernelSyscalls syscalls)
      : connection_(std::move(connection)), syscalls_(syscalls) {}
  [[nodiscard]] Result<std::unique_ptr<luo::Session>> ask(const char* command, std::string_view name,
                                                          bool incoming);
  std::shared_ptr<AgentConnection> connection_;
  luo::KernelSyscalls syscalls_;
  std::optional<std::vector<std::string>> restore_args_;
};

// A session received from the agent: a luo::KernelSession on the duplicate,
// plus the release rules above.
class AgentSession final : public luo::Session {
 public:
  AgentSession(std::unique_ptr<luo::KernelSession> session, std::shared_ptr<AgentConnection> connection)
      : session_(std::move(session)), connection_(std::move(connection)) {}
  ~AgentSession() override;

  [[nodiscard]] const std::string& name() const override { return session_->name(); }
  [[nodiscard]] bool incoming() const override { return session_->incoming(); }
  [[nodiscard]] Result<void> preserve(FdRef fd, uint64_t token) override { return session_->preserve(fd, token); }
  [[nodiscard]] Result<UniqueFd> retrieve(uint64_t token) override { return session_->retrieve(token); }
  // FINISH on the session, then release-session (a failed release is only
  // logged: the kernel is done with the session either way).
  [[nodiscard]] Result<void> finish() override;

  [[nodiscard]] luo::KernelSession& kernel_session() { return *session_; }

 private:
  std::unique_ptr<luo::KernelSession> session_;
  std::shared_ptr<AgentConnection> connection_;
  bool released_ = false;
};

}  // namespace vmm

#include "update/agent_backend.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "update/luo_agent.h"
#include "update/session_source.h"

namespace vmm {
namespace {

using nlohmann::json;

}  // namespace

Result<std::shared_ptr<AgentConnection>> AgentConnection::connect(const std::string& path,
                                                                  std::chrono::milliseconds timeout) {
  auto client = control::Client::connect(path, timeout);
  if (!client) {
    const int code = client.error().code;
    const std::string why = code == ENOENT         ? "no socket there"
                            : code == ECONNREFUSED ? "nothing listens on it: the stale socket of an agent that is gone"
                                                   : client.error().describe();
    return std::unexpected(Error{code, fmt::format("no LUO agent answers at {} ({}): start `vmm agent --socket {}`, "
                                                   "or leave the agent out (no --luo-agent, no ${}) to use "
                                                   "/dev/liveupdate directly",
                                                   path, why, path, kLuoAgentEnvironment)});
  }
  // The greeting says which protocol the agent speaks; refuse another one
  // before asking it anything.
  const json& greeting = client->greeting();
  const json* protocol = nullptr;
  if (auto qmp = greeting.find("QMP"); qmp != greeting.end() && qmp->is_object()) {
    if (auto version = qmp->find("version"); version != qmp->end() && version->is_object()) {
      if (auto agent = version->find("luo-agent"); agent != version->end() && agent->is_object()) {
        if (auto number = agent->find("protocol"); number != agent->end()) protocol = &*number;
      }
    }
  }
  if (!protocol)
    return fail(fmt::format("{} is not a LUO agent's socket (its greeting names no luo-agent protocol): is it a "
                            "vmm's control socket? Give the agent's socket (`vmm agent --socket PATH`)",
                            path),
                EPROTO);
  if (!protocol->is_number_integer() || *protocol != kLuoAgentProtocol)
    return fail(fmt::format("the LUO agent at {} speaks protocol {}, this vmm protocol {}: run an agent and a vmm of "
                            "the same protocol (restart the agent from this vmm's binary)",
                            path, protocol->dump(), kLuoAgentProtocol),
                EPROTO);
  VMM_TRY(with_context(client->negotiate(), "negotiating with the LUO agent at " + path));
  std::shared_ptr<AgentConnection> connection(new AgentConnection(std::move(*client), path));
  VMM_TRY_ASSIGN(hello, connection->call("hello", json{{"protocol", kLuoAgentProtocol}}));
  if (hello.is_object() && hello.contains("pid") && hello["pid"].is_number_integer())
    connection->agent_pid_ = hello["pid"].get<pid_t>();
  // An agent older than the features has none: the vmm then asks only what
  // protocol 1 always had.
  if (hello.is_object() && hello.contains("features") && hello["features"].is_array())
    for (const json& feature : hello["features"])
      if (feature.is_string()) connection->features_.push_back(feature.get<std::string>());
  return connection;
}

bool AgentConnection::has_feature(std::string_view feature) const {
  for (const std::string& have : features_)
    if (have == feature) return true;
  return false;
}

Result<json> AgentConnection::call(const std::string& command, const json& arguments, std::vector<UniqueFd>* fds) {
  std::lock_guard lock(mutex_);
  // Nothing from an earlier reply may be taken for this one's.
  [[maybe_unused]] auto stale = client_.take_received_fds();
  auto result = client_.execute(command, arguments);
  std::vector<UniqueFd> received = client_.take_received_fds();
  if (!result)
    return std::unexpected(result.error().with_context(fmt::format("the LUO agent at {} ({})", path_, command)));
  if (!*result) return fail(result->error().desc, EIO);
  if (fds) *fds = std::move(received);
  return std::move(**result);
}

Result<std::unique_ptr<AgentBackend>> AgentBackend::connect(const std::string& path, luo::KernelSyscalls syscalls) {
  VMM_TRY_ASSIGN(connection, AgentConnection::connect(path));
  return std::unique_ptr<AgentBackend>(new AgentBackend(std::move(connection), syscalls));
}

Result<std::unique_ptr<luo::Session>> AgentBackend::ask(const char* command, std::string_view name, bool incoming) {
  VMM_TRY(luo::validate_session_name(name));
  json arguments{{"name", std::string(name)}};
  if (!incoming && restore_args_) {
    if (connection_->has_feature(kLuoAgentFeatureRestoreArgs))
      arguments["restore"] = json{{"args", *restore_args_}};
    else
      spdlog::warn("luo: the LUO agent at {} takes no restore arguments (an older agent): after the kexec, restore "
                   "'{}' by hand (`vmm restore --session {}`)",
                   connection_->path(), name, name);
  }
  std::vector<UniqueFd> fds;
  VMM_TRY_ASSIGN(reply, connection_->call(command, arguments, &fds));
  if (fds.size() != 1)
    return fail(fmt::format("the LUO agent at {} answered {} '{}' with {} descriptors instead of the session's one",
                            connection_->path(), command, name, fds.size()),
                EPROTO);
  const std::string direction = reply.is_object() ? reply.value("direction", "") : "";
  if (direction != (incoming ? "incoming" : "outgoing"))
    return fail(fmt::format("the LUO agent at {} answered {} '{}' with a session of direction '{}'",
                            connection_->path(), command, name, direction),
                EPROTO);
  spdlog::debug("luo: {} '{}' from the agent at {} (fd {})", command, name, connection_->path(), fds.front().get());
  auto session = std::make_unique<luo::KernelSession>(std::move(fds.front()), std::string(name), incoming, syscalls_);
  return std::unique_ptr<luo::Session>(std::make_unique<AgentSession>(std::move(session), connection_));
}

Result<std::unique_ptr<luo::Session>> AgentBackend::create_session(std::string_view name) {
  return ask("create-session", name, false);
}

Result<std::unique_ptr<luo::Session>> AgentBackend::retrieve_session(std::string_view name) {
  return ask("retrieve-session", name, true);
}

Result<void> AgentBackend::release_session(std::string_view name) {
  VMM_TRY(connection_->call("release-session", json{{"name", std::string(name)}}));
  return {};
}

Result<json> AgentBackend::list_sessions() { return connection_->call("list-sessions", json::object()); }

AgentSession::~AgentSession() {
  // An unfinished incoming session stays with the agent for the next restore.
  if (released_ || session_->incoming()) return;
  // Destroying an outgoing session cancels it (luo/session.h): the agent's
  // reference must go too, or it would still cross the kexec.
  if (auto released = connection_->call("release-session", json{{"name", session_->name()}}); !released)
    spdlog::error("luo: cannot cancel the outgoing session '{}' at the agent: {}; it stays preserved until the "
                  "agent releases it (release-session) or stops",
                  session_->name(), released.error().describe());
}

Result<void> AgentSession::finish() {
  VMM_TRY(session_->finish());
  if (released_) return {};
  released_ = true;
  if (auto released = connection_->call("release-session", json{{"name", session_->name()}}); !released)
    spdlog::warn("luo: the session '{}' is finished, but the agent did not release it: {}", session_->name(),
                 released.error().describe());
  return {};
}

}  // namespace vmm

#include "update/luo_agent.h"

#include <poll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/fd_passing.h"
#include "vmm/control/server.h"

namespace vmm {
namespace {

using nlohmann::json;
using control::CommandError;
using control::CommandResult;

CommandResult error_result(std::string desc) {
  return std::unexpected(CommandError{control::kGenericError, std::move(desc)});
}

// The command's arguments, checked: exactly the members `allowed`, each a
// string, or an error reply naming what is wrong.
Result<std::map<std::string, std::string>> string_arguments(const std::string& command, const json& arguments,
                                                            std::initializer_list<const char*> required) {
  std::map<std::string, std::string> out;
  for (const auto& [key, value] : arguments.items()) {
    bool known = false;
    for (const char* name : required) known |= key == name;
    if (!known) return fail(fmt::format("{}: unknown argument '{}'", command, key), EINVAL);
    if (!value.is_string()) return fail(fmt::format("{}: argument '{}' must be a string", command, key), EINVAL);
    out[key] = value.get<std::string>();
  }
  for (const char* name : required)
    if (!out.contains(name)) return fail(fmt::format("{}: missing argument '{}'", command, name), EINVAL);
  return out;
}

const char* direction(const luo::Session& session) { return session.incoming() ? "incoming" : "outgoing"; }

std::string utc(std::chrono::system_clock::time_point at) {
  return fmt::format("{:%FT%TZ}", std::chrono::floor<std::chrono::seconds>(at));
}

int64_t unix_ns(std::chrono::system_clock::time_point at) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(at.time_since_epoch()).count();
}

}  // namespace

json luo_agent_version() {
  json version = control::program_version();
  version["luo-agent"] = {{"protocol", kLuoAgentProtocol}};
  return version;
}

Result<std::unique_ptr<LuoAgent>> LuoAgent::open(const std::string& device, luo::KernelSyscalls syscalls) {
  VMM_TRY_ASSIGN(backend, with_context(luo::KernelBackend::open(device, syscalls), "the LUO agent cannot start"));
  return std::unique_ptr<LuoAgent>(new LuoAgent(std::move(backend), device));
}

CommandResult LuoAgent::execute(const std::string& command, const json& arguments) {
  return execute(command, arguments, control::CommandContext{});
}

CommandResult LuoAgent::execute(const std::string& command, const json& arguments,
                                const control::CommandContext& context) {
  if (command == "hello") {
    for (const auto& [key, value] : arguments.items())
      if (key != "protocol") return error_result("hello: unknown argument '" + key + "'");
    auto protocol = arguments.find("protocol");
    if (protocol == arguments.end() || !protocol->is_number_integer())
      return error_result("hello: argument 'protocol' must be an integer (this agent speaks protocol " +
                          std::to_string(kLuoAgentProtocol) + ")");
    if (*protocol != kLuoAgentProtocol)
      return error_result(fmt::format("hello: this LUO agent speaks protocol {}, the client protocol {}: run a vmm "
                                      "and an agent of the same protocol (restart the agent from the installed "
                                      "vmm, or update the vmm)",
                                      kLuoAgentProtocol, protocol->dump()));
    return json{{"protocol", kLuoAgentProtocol}, {"device", device_path_}, {"pid", ::getpid()}};
  }
  if (command == "list-sessions") {
    if (!arguments.empty()) return error_result("list-sessions takes no arguments");
    return list();
  }
  if (command != "create-session" && command != "retrieve-session" && command != "release-session")
    return std::unexpected(CommandError{control::kCommandNotFound,
                                        "The command " + command +
                                            " has not been found (the LUO agent has hello, create-session, "
                                            "retrieve-session, release-session and list-sessions)"});
  auto checked = string_arguments(command, arguments, {"name"});
  if (!checked) return error_result(checked.error().message);
  const std::string& name = checked->at("name");
  if (auto valid = luo::validate_session_name(name); !valid)
    return error_result(command + ": " + valid.error().describe());
  if (command == "create-session") return create(name, context);
  if (command == "retrieve-session") return retrieve(name, context);
  return release(name, context);
}

CommandResult LuoAgent::hand_out(Held& held, const control::CommandContext& context) {
  auto* kernel_session = dynamic_cast<luo::KernelSession*>(held.session.get());
  if (!kernel_session) return error_result("internal error: the agent holds a session that is not the kernel's");
  if (!context.reply_fds)
    return error_result("this connection cannot carry descriptors: ask over the agent's Unix socket");
  auto copy = duplicate_fd(kernel_session->fd());
  if (!copy) return error_result("cannot duplicate the session's descriptor: " + copy.error().describe());
  context.reply_fds->push_back(std::move(*copy));
  held.last_client = context.peer_pid;
  ++held.handed_out;
  json out = describe_locked(held.session->name(), held);
  out["fds"] = 1;
  return out;
}

CommandResult LuoAgent::create(const std::string& name, const control::CommandContext& context) {
  std::lock_guard lock(mutex_);
  if (auto it = sessions_.find(name); it != sessions_.end()) {
    const Held& held = it->second;
    return error_result(fmt::format(
        "create-session: the agent already holds the {} session '{}' (since {}, last asked for by pid {}): "
        "release-session it first (an outgoing one is cancelled then), or pick another name",
        direction(*held.session), name, utc(held.since), held.last_client));
  }
  auto created = device_->create_session(name);
  if (!created) return error_result("create-session: " + created.error().describe());
  Held& held = sessions_[name];
  held.session = std::move(*created);
  held.since = std::chrono::system_clock::now();
  spdlog::info("luo agent: created the outgoing session '{}' for pid {}", name, context.peer_pid);
  return hand_out(held, context);
}

CommandResult LuoAgent::retrieve(const std::string& name, const control::CommandContext& context) {
  std::lock_guard lock(mutex_);
  if (auto it = sessions_.find(name); it != sessions_.end()) {
    Held& held = it->second;
    if (!held.session->incoming())
      return error_result(fmt::format(
          "retrieve-session: '{}' is an outgoing session of this kernel (created for pid {}): it can be retrieved "
          "only after the kexec, in the next kernel",
          name, held.last_client));
    spdlog::info("luo agent: handing the incoming session '{}' again, to pid {} (pid {} had it before)", name,
                 context.peer_pid, held.last_client);
    return hand_out(held, context);
  }
  auto retrieved = device_->retrieve_session(name);
  if (!retrieved) return error_result("retrieve-session: " + retrieved.error().describe());
  Held& held = sessions_[name];
  held.session = std::move(*retrieved);
  held.since = std::chrono::system_clock::now();
  spdlog::info("luo agent: retrieved the incoming session '{}' for pid {}", name, context.peer_pid);
  return hand_out(held, context);
}

CommandResult LuoAgent::release(const std::string& name, const control::CommandContext& context) {
  std::lock_guard lock(mutex_);
  auto it = sessions_.find(name);
  if (it == sessions_.end())
    return error_result(fmt::format("release-session: the agent holds no session '{}' (list-sessions shows what "
                                    "it holds)",
                                    name));
  json out = describe_locked(name, it->second);
  const bool outgoing = !it->second.session->incoming();
  // The agent's descriptor goes; the session lives on only in descriptors
  // clients still have (an outgoing one is cancelled when they close them).
  sessions_.erase(it);
  if (outgoing) {
    spdlog::warn("luo agent: pid {} released the outgoing session '{}': it is cancelled once no client holds it",
                 context.peer_pid, name);
  } else {
    spdlog::info("luo agent: pid {} released the incoming session '{}'", context.peer_pid, name);
  }
  out["released"] = true;
  return out;
}

json LuoAgent::describe_locked(const std::string& name, const Held& held) const {
  return json{{"name", name},
              {"direction", direction(*held.session)},
              {"held_since", utc(held.since)},
              {"held_since_ns", unix_ns(held.since)},
              {"last_client_pid", held.last_client},
              {"handed_out", held.handed_out}};
}

json LuoAgent::list() const {
  std::lock_guard lock(mutex_);
  json sessions = json::array();
  for (const auto& [name, held] : sessions_) sessions.push_back(describe_locked(name, held));
  return json{{"sessions", std::move(sessions)}};
}

size_t LuoAgent::held_sessions() const {
  std::lock_guard lock(mutex_);
  return sessions_.size();
}

namespace {

// A socket file left by an agent that died is in the way of the new one's
// bind; one that answers is another agent's, which stays.
Result<void> clear_stale_socket(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return {};
  if (!S_ISSOCK(st.st_mode))
    return fail(fmt::format("{} exists and is not a socket: remove it or give --socket another path", path), EEXIST);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof(address.sun_path)) return {};  // Server::listen reports it
  std::memcpy(address.sun_path, path.data(), path.size());
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe) return fail_errno("cannot create a socket");
  if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0)
    return fail(fmt::format("another LUO agent already serves {} (the device is single-open: one agent per host)",
                            path),
                EADDRINUSE);
  if (errno != ECONNREFUSED) return {};
  spdlog::warn("luo agent: removing the stale socket {} of an agent that is gone", path);
  if (::unlink(path.c_str()) != 0) return fail_errno("cannot remove the stale socket " + path);
  return {};
}

}  // namespace

Result<std::unique_ptr<control::Server>> listen_luo_agent(const std::string& path, LuoAgent& agent) {
  control::ServerOptions options;
  options.version = luo_agent_version();
  options.max_line_bytes = kMaxLuoAgentRequestBytes;
  // Every vmm of the host may restore at once after a kexec.
  options.max_clients = 64;
  return control::Server::listen(path, agent, options);
}

int run_luo_agent(const std::string& socket_path, const std::string& device, FdRef signals) {
  if (socket_path.empty()) {
    spdlog::error("vmm agent: --socket is empty: give the path of the socket to create (default {})",
                  kDefaultLuoAgentSocket);
    return 2;
  }
  // The device first: without it there is nothing to serve, and nothing is
  // created on disk.
  auto agent = LuoAgent::open(device);
  if (!agent) {
    spdlog::error("{}", agent.error().describe());
    return 1;
  }
  // /run/vmm may not exist on a fresh boot: the agent is the first to need it.
  const auto slash = socket_path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    const std::string dir = socket_path.substr(0, slash);
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
      spdlog::error("vmm agent: cannot create the socket's directory {}: {}", dir, std::strerror(errno));
      return 1;
    }
  }
  if (auto cleared = clear_stale_socket(socket_path); !cleared) {
    spdlog::error("vmm agent: {}", cleared.error().describe());
    return 1;
  }
  auto server = listen_luo_agent(socket_path, **agent);
  if (!server) {
    spdlog::error("vmm agent: {}", server.error().describe());
    return 1;
  }
  spdlog::info("luo agent: {} open, serving {} (protocol {})", device, socket_path, kLuoAgentProtocol);
  while (true) {
    pollfd ready{signals.get(), POLLIN, 0};
    if (::poll(&ready, 1, -1) < 0 && errno != EINTR) {
      spdlog::error("vmm agent: poll: {}", std::strerror(errno));
      break;
    }
    signalfd_siginfo info{};
    if (::read(signals.get(), &info, sizeof info) == sizeof info) break;
  }
  (*server)->stop();
  const size_t held = (*agent)->held_sessions();
  if (held > 0) {
    spdlog::warn("luo agent: stopping with {} session(s) held: outgoing ones are cancelled, incoming ones finished "
                 "(their unretrieved files dropped) unless a vmm still holds them",
                 held);
  }
  return 0;
}

}  // namespace vmm

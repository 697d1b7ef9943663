#include "update/luo_agent.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/fd_passing.h"
#include "base/memfd.h"
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
    // Features added within protocol 1: a client asks for them only when
    // listed, so a vmm and an older agent of the same protocol still agree.
    return json{{"protocol", kLuoAgentProtocol},
                {"device", device_path_},
                {"pid", ::getpid()},
                {"features", json::array({kLuoAgentFeatureRestoreArgs, kLuoAgentFeatureRegistry})}};
  }
  for (const char* plain : {"list-sessions", "seal-registry", "unseal-registry", "list-restores"}) {
    if (command != plain) continue;
    if (!arguments.empty()) return error_result(command + " takes no arguments");
    if (command == "list-sessions") return list();
    if (command == "seal-registry") return seal_registry(context);
    if (command == "unseal-registry") return unseal_registry(context);
    return list_restores();
  }
  if (command == "create-session") return create_command(arguments, context);
  if (command != "retrieve-session" && command != "release-session")
    return std::unexpected(CommandError{control::kCommandNotFound,
                                        "The command " + command +
                                            " has not been found (the LUO agent has hello, create-session, "
                                            "retrieve-session, release-session, list-sessions, seal-registry, "
                                            "unseal-registry and list-restores)"});
  auto checked = string_arguments(command, arguments, {"name"});
  if (!checked) return error_result(checked.error().message);
  const std::string& name = checked->at("name");
  if (auto valid = luo::validate_session_name(name); !valid)
    return error_result(command + ": " + valid.error().describe());
  if (command == "retrieve-session") {
    reap_restores();  // a restore that just ended no longer owns its session
    return retrieve(name, context);
  }
  return release(name, context);
}

CommandResult LuoAgent::create_command(const json& arguments, const control::CommandContext& context) {
  // "restore" is the one member that is not a string: checked on its own.
  json names = arguments;
  std::optional<std::vector<std::string>> restore_args;
  if (auto restore = arguments.find("restore"); restore != arguments.end()) {
    if (!restore->is_object())
      return error_result("create-session: argument 'restore' must be an object {\"args\": [strings]}");
    for (const auto& [key, value] : restore->items())
      if (key != "args")
        return error_result("create-session: unknown member 'restore." + key + "' (restore has only 'args')");
    auto args = restore->find("args");
    if (args == restore->end()) return error_result("create-session: 'restore' needs 'args', an array of strings");
    auto parsed = parse_restore_args(*args);
    if (!parsed) return error_result("create-session: " + parsed.error().message);
    restore_args = std::move(*parsed);
    names.erase("restore");
  }
  auto checked = string_arguments("create-session", names, {"name"});
  if (!checked) return error_result(checked.error().message);
  const std::string& name = checked->at("name");
  if (auto valid = luo::validate_session_name(name); !valid)
    return error_result("create-session: " + valid.error().describe());
  if (name == kRegistrySessionName)
    return error_result(fmt::format("create-session: '{}' is the name of the agent's own registry session: give the "
                                    "VM another name",
                                    name));
  return create(name, std::move(restore_args), context);
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

CommandResult LuoAgent::create(const std::string& name, std::optional<std::vector<std::string>> restore_args,
                               const control::CommandContext& context) {
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
  held.restore_args = std::move(restore_args);
  spdlog::info("luo agent: created the outgoing session '{}' for pid {}", name, context.peer_pid);
  if (registry_ && !registry_->session->incoming())
    spdlog::warn("luo agent: the outgoing session '{}' was created after seal-registry: the sealed registry does not "
                 "name it, and it is not restored after the kexec unless seal-registry runs again",
                 name);
  return hand_out(held, context);
}

CommandResult LuoAgent::retrieve(const std::string& name, const control::CommandContext& context) {
  std::lock_guard lock(mutex_);
  // Two vmms restoring one VM would run the same guest memory twice: while
  // the agent's own restore of it runs, only that process gets the session.
  for (const Restore& restore : restores_) {
    if (restore.name == name && restore.state == "running" && restore.pid != context.peer_pid)
      return error_result(fmt::format("retrieve-session: '{}' is being restored by pid {}, which this agent started "
                                      "(--restore-vms; log {}): wait until list-restores shows it ended, then retry "
                                      "if it failed",
                                      name, restore.pid, restore.log));
  }
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
    if (registry_ && !registry_->session->incoming())
      spdlog::warn("luo agent: the sealed registry still names '{}': its restore will fail after the kexec unless "
                   "seal-registry runs again",
                   name);
  } else {
    spdlog::info("luo agent: pid {} released the incoming session '{}'", context.peer_pid, name);
  }
  out["released"] = true;
  return out;
}

json LuoAgent::describe_locked(const std::string& name, const Held& held) const {
  json out{{"name", name},
           {"direction", direction(*held.session)},
           {"held_since", utc(held.since)},
           {"held_since_ns", unix_ns(held.since)},
           {"last_client_pid", held.last_client},
           {"handed_out", held.handed_out}};
  if (held.restore_args) out["restore"] = json{{"args", *held.restore_args}};
  return out;
}

json LuoAgent::describe_registry_locked() const {
  if (!registry_) return nullptr;
  json out{{"session", registry_->session->name()},
           {"direction", direction(*registry_->session)},
           {"held_since", utc(registry_->since)}};
  if (registry_->session->incoming()) {
    out["error"] = registry_->error;
  } else {
    out["sealed"] = registry_->names;
  }
  return out;
}

json LuoAgent::list() const {
  std::lock_guard lock(mutex_);
  json sessions = json::array();
  for (const auto& [name, held] : sessions_) sessions.push_back(describe_locked(name, held));
  return json{{"sessions", std::move(sessions)}, {"registry", describe_registry_locked()}};
}

CommandResult LuoAgent::seal_registry(const control::CommandContext& context) {
  std::lock_guard lock(mutex_);
  if (registry_ && registry_->session->incoming())
    return error_result(fmt::format("seal-registry: the agent holds the previous kernel's unusable registry ({}): "
                                    "unseal-registry drops it, then seal again",
                                    registry_->error));
  // The kernel has one session per name: the previous registry goes first
  // (closing the agent's only descriptor of it cancels it).
  if (registry_) {
    spdlog::info("luo agent: replacing the registry sealed at {}", utc(registry_->since));
    registry_.reset();
  }
  Registry registry;
  registry.sealed_at_ns = unix_ns(std::chrono::system_clock::now());
  registry.agent_pid = ::getpid();
  std::vector<std::string> names;
  for (const auto& [name, held] : sessions_) {
    if (held.session->incoming()) continue;  // already after a kexec: nothing of it crosses the next one as is
    registry.entries.push_back(RegistryEntry{name, held.restore_args.value_or(std::vector<std::string>{})});
    names.push_back(name);
    if (!held.restore_args)
      spdlog::warn("luo agent: the session '{}' has no restore arguments (an older vmm made it): it is restored with "
                   "the defaults (no control socket, console on the restore's log)",
                   name);
  }
  const std::vector<uint8_t> bytes = encode_registry(registry);
  // Written whole and sealed before it is preserved: a preserved memfd can
  // neither grow nor shrink.
  auto memfd = sealed_memfd("vmm-luo-agent-registry", bytes);
  if (!memfd) return error_result("seal-registry: " + memfd.error().describe());
  auto created = device_->create_session(kRegistrySessionName);
  if (!created) return error_result("seal-registry: " + created.error().describe());
  if (auto preserved = (*created)->preserve(memfd->ref(), kRegistryToken); !preserved)
    return error_result("seal-registry: preserving the registry: " + preserved.error().describe());
  registry_ = RegistrySession{std::move(*created), names, std::chrono::system_clock::now(), {}};
  spdlog::info("luo agent: pid {} sealed the registry: {} session(s) [{}], {} bytes, format {}.{}", context.peer_pid,
               names.size(), fmt::join(names, ", "), bytes.size(), kRegistryMajor, kRegistryMinor);
  return json{{"session", kRegistrySessionName},
              {"sealed", names},
              {"bytes", bytes.size()},
              {"format", fmt::format("{}.{}", kRegistryMajor, kRegistryMinor)}};
}

CommandResult LuoAgent::unseal_registry(const control::CommandContext& context) {
  std::lock_guard lock(mutex_);
  if (!registry_) return json{{"unsealed", false}};
  json out = describe_registry_locked();
  registry_.reset();
  spdlog::info("luo agent: pid {} dropped the registry", context.peer_pid);
  out["unsealed"] = true;
  return out;
}

namespace {

// A session name may hold '/' and start with '.': the log file's name may not.
std::string log_file_name(const std::string& session) {
  std::string out = session;
  for (char& c : out)
    if (c == '/') c = '_';
  if (out.front() == '.') out.front() = '_';
  return out + ".restore.log";
}

Result<pid_t> posix_spawn_restore(const std::vector<std::string>& argv, FdRef log) {
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attributes;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawnattr_init(&attributes);
  ::posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  ::posix_spawn_file_actions_adddup2(&actions, log.get(), 1);
  ::posix_spawn_file_actions_adddup2(&actions, log.get(), 2);
  // The agent blocks SIGINT/SIGTERM (it reads them from a signalfd) and
  // ignores SIGPIPE: a restore starts with neither.
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGPIPE);
  ::posix_spawnattr_setsigmask(&attributes, &none);
  ::posix_spawnattr_setsigdefault(&attributes, &defaults);
  ::posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = 0;
  const int error = ::posix_spawn(&pid, argv.front().c_str(), &actions, &attributes, args.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  ::posix_spawnattr_destroy(&attributes);
  if (error != 0) return fail(fmt::format("cannot start {}: {}", argv.front(), std::strerror(error)), error);
  return pid;
}

}  // namespace

size_t LuoAgent::restore_vms(const RestoreVmsOptions& options) {
  std::unique_ptr<luo::Session> session;
  {
    std::lock_guard lock(mutex_);
    auto retrieved = device_->retrieve_session(kRegistrySessionName);
    if (!retrieved) {
      if (retrieved.error().code == ENOENT)
        spdlog::info("luo agent: --restore-vms: the previous kernel handed over no registry ('{}'): nothing to "
                     "restore (a cold boot, or no seal-registry before the kexec)",
                     kRegistrySessionName);
      else
        spdlog::error("luo agent: --restore-vms: cannot retrieve the registry session: {}; nothing restored",
                      retrieved.error().describe());
      return 0;
    }
    session = std::move(*retrieved);
  }
  auto decoded = [&]() -> Result<Registry> {
    VMM_TRY_ASSIGN(file, session->retrieve(kRegistryToken));
    VMM_TRY_ASSIGN(bytes, read_whole_file(file.ref(), kMaxRegistryBytes, "the registry memfd"));
    return decode_registry(bytes);
  }();
  if (!decoded) {
    spdlog::error("luo agent: --restore-vms: {}", decoded.error().describe());
    std::lock_guard lock(mutex_);
    registry_ = RegistrySession{std::move(session), {}, std::chrono::system_clock::now(), decoded.error().describe()};
    return 0;
  }
  // Read: the registry's session has served its purpose. The VMs' own
  // sessions are separate and stay in the kernel for their restores.
  if (auto finished = session->finish(); !finished)
    spdlog::warn("luo agent: cannot finish the registry session: {}", finished.error().describe());
  session.reset();
  spdlog::info("luo agent: the registry sealed by pid {} names {} VM(s)", decoded->agent_pid,
               decoded->entries.size());
  for (const RegistryEntry& entry : decoded->entries) start_restore(entry, options);
  return decoded->entries.size();
}

void LuoAgent::start_restore(const RegistryEntry& entry, const RestoreVmsOptions& options) {
  Restore restore;
  restore.name = entry.name;
  restore.argv = {options.vmm, "restore", "--session", entry.name, "--luo-agent", options.agent_socket};
  restore.argv.insert(restore.argv.end(), entry.restore_args.begin(), entry.restore_args.end());
  restore.log = options.log_dir + "/" + log_file_name(entry.name);
  auto started = [&]() -> Result<pid_t> {
    if (::mkdir(options.log_dir.c_str(), 0700) != 0 && errno != EEXIST)
      return fail_errno("cannot create the restore log directory " + options.log_dir +
                        " (--restore-log-dir names another)");
    UniqueFd log(::open(restore.log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOCTTY, 0600));
    if (!log) return fail_errno("cannot open the restore log " + restore.log);
    return options.spawn ? options.spawn(restore.argv, log.ref()) : posix_spawn_restore(restore.argv, log.ref());
  }();
  if (started) {
    restore.pid = *started;
    restore.state = "running";
    spdlog::info("luo agent: restoring '{}': pid {}, log {}: {}", entry.name, restore.pid, restore.log,
                 fmt::join(restore.argv, " "));
  } else {
    restore.state = "not-started";
    restore.error = started.error().describe();
    spdlog::error("luo agent: cannot restore '{}': {}; its session stays in the kernel: run `vmm restore --session {} "
                  "--luo-agent {}` by hand",
                  entry.name, restore.error, entry.name, options.agent_socket);
  }
  std::lock_guard lock(mutex_);
  restores_.push_back(std::move(restore));
}

void LuoAgent::reap_restores() {
  std::lock_guard lock(mutex_);
  for (Restore& restore : restores_) {
    if (restore.state != "running") continue;
    int status = 0;
    const pid_t done = ::waitpid(restore.pid, &status, WNOHANG);
    if (done == 0) continue;
    if (done < 0) {
      if (errno == EINTR) continue;
      restore.state = "unknown";
      restore.error = fmt::format("waitpid: {} (not a child of this agent)", std::strerror(errno));
      continue;
    }
    if (WIFEXITED(status)) {
      restore.state = "exited";
      restore.status = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
      restore.state = "killed";
      restore.status = WTERMSIG(status);
    } else {
      continue;  // stopped or continued: still there
    }
    auto log = restore.state == "exited" && restore.status == 0 ? spdlog::level::info : spdlog::level::warn;
    spdlog::log(log, "luo agent: the restore of '{}' (pid {}) {} {}{}", restore.name, restore.pid,
                restore.state == "exited" ? "exited with status" : "was killed by signal", restore.status,
                log == spdlog::level::info ? ""
                                           : fmt::format(": see {}; the agent keeps its session if it was retrieved, "
                                                         "for `vmm restore --session {}`",
                                                         restore.log, restore.name));
  }
}

bool LuoAgent::restores_running() const {
  std::lock_guard lock(mutex_);
  for (const Restore& restore : restores_)
    if (restore.state == "running") return true;
  return false;
}

json LuoAgent::list_restores() {
  reap_restores();
  std::lock_guard lock(mutex_);
  json out = json::array();
  for (const Restore& restore : restores_) {
    json entry{{"name", restore.name}, {"state", restore.state}, {"argv", restore.argv}, {"log", restore.log}};
    entry["pid"] = restore.pid > 0 ? json(restore.pid) : json(nullptr);
    if (restore.state == "exited") entry["status"] = restore.status;
    if (restore.state == "killed") entry["signal"] = restore.status;
    if (!restore.error.empty()) entry["error"] = restore.error;
    out.push_back(std::move(entry));
  }
  return json{{"restores", std::move(out)}};
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

int run_luo_agent(const LuoAgentOptions& options, FdRef signals) {
  const std::string& socket_path = options.socket;
  const std::string& device = options.device;
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
  // Only now: the restores ask this agent for their sessions.
  if (options.restore_vms) {
    RestoreVmsOptions restore = options.restore;
    restore.agent_socket = socket_path;
    (*agent)->restore_vms(restore);
  }
  while (true) {
    // Restores running: wake up now and then to reap them (their exit
    // status is for list-restores and the log).
    pollfd ready{signals.get(), POLLIN, 0};
    const int timeout_ms = (*agent)->restores_running() ? 500 : -1;
    const int polled = ::poll(&ready, 1, timeout_ms);
    (*agent)->reap_restores();
    if (polled == 0) continue;
    if (polled < 0 && errno != EINTR) {
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

#include "update/session_source.h"

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "update/agent_backend.h"
#include "update/luo_agent.h"
#include "update/restore.h"

namespace vmm {

SessionSourceOptions session_source_options(const std::string& default_socket) {
  SessionSourceOptions options;
  if (const char* named = std::getenv(kLuoAgentEnvironment); named && *named) {
    options.agent_socket = named;
    options.agent_required = true;
    return options;
  }
  const std::string fallback = default_socket.empty() ? kDefaultLuoAgentSocket : default_socket;
  struct stat st {};
  if (::stat(fallback.c_str(), &st) == 0) options.agent_socket = fallback;
  return options;
}

Result<SessionSource> open_session_source(const SessionSourceOptions& options, const std::atomic<bool>* cancelled,
                                          std::chrono::milliseconds busy_wait) {
  if (!options.agent_socket.empty()) {
    auto agent = AgentBackend::connect(options.agent_socket, options.syscalls);
    if (agent) {
      if (options.restore_args) (*agent)->set_restore_args(*options.restore_args);
      spdlog::info("luo: sessions from the LUO agent at {} (pid {})", options.agent_socket,
                   (*agent)->connection().agent_pid());
      return SessionSource{std::move(*agent), "agent", options.agent_socket};
    }
    // A socket that answers but is not an agent of our protocol is never
    // passed over: the device would be busy with that agent anyway.
    if (options.agent_required)
      return std::unexpected(agent.error().with_context(
          fmt::format("{} (--luo-agent) names the LUO agent to use", kLuoAgentEnvironment)));
    if (agent.error().code == EPROTO) return std::unexpected(agent.error());
    spdlog::warn("luo: {}; using {} directly", agent.error().describe(), options.device);
  }
  VMM_TRY_ASSIGN(device, open_liveupdate(cancelled, busy_wait, options.device, options.syscalls));
  spdlog::info("luo: sessions from {} (no LUO agent)", options.device);
  return SessionSource{std::move(device), "device", options.device};
}

std::vector<std::string> restore_arguments(const LaunchOptions& launch) {
  const auto absolute = [](const std::string& path) {
    std::error_code error;
    auto full = std::filesystem::absolute(path, error);
    return error ? path : full.string();
  };
  std::vector<std::string> args;
  if (!launch.control_socket_path.empty()) args.insert(args.end(), {"--control-socket", absolute(launch.control_socket_path)});
  const bool console_file = launch.console != "stdout" && launch.console != "none";
  args.insert(args.end(), {"--console", console_file ? absolute(launch.console) : launch.console});
  args.insert(args.end(), {"--log-level", launch.log_level, "--kvm-device", launch.kvm_device});
  return args;
}

std::string probe_session_source_kind(const SessionSourceOptions& options) {
  if (options.agent_socket.empty()) return "device";
  return AgentConnection::connect(options.agent_socket, std::chrono::seconds(2)) ? "agent" : "device";
}

}  // namespace vmm

// vmmctl: a command-line client for the vmm control socket.
//
//   vmmctl -s SOCK status|stop|cont|memory|vcpus|guest|verify|quit|update-status
//   vmmctl -s SOCK live-update [--mode transfer|exec|kexec] [--binary PATH] [--kernel PATH ...]
//   vmmctl -s SOCK raw '{"execute": "query-status"}'     (or `raw -` for lines on stdin)
//   vmmctl -s SOCK --wait-event STOP [stop]               (waits for an event)
//
// Prints the command's "return" value as JSON on stdout. Exit status: 0 on
// success, 1 when the vmm answered with an error (its desc goes to stderr),
// 2 when the vmm could not be reached or did not answer in time, or the
// request was refused before sending (an empty raw request).
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "tools/host_update.h"
#include "vmm/control/client.h"

namespace {

using nlohmann::json;
using vmm::control::Client;

constexpr int kExitCommandFailed = 1;
constexpr int kExitUnreachable = 2;
// How long `live-update` waits for its reply unless --timeout says otherwise.
constexpr double kLiveUpdateReplySeconds = 600;

struct Output {
  bool compact = false;
  bool show_events = false;

  void print(const json& value) const {
    std::cout << (compact ? value.dump(-1, ' ', false, json::error_handler_t::replace)
                          : value.dump(2, ' ', false, json::error_handler_t::replace))
              << '\n'
              << std::flush;
  }
  void print_events(Client& client) const {
    if (!show_events) return;
    for (const json& event : client.take_events()) print(event);
  }
};

int unreachable(const std::string& what) {
  std::cerr << "vmmctl: " << what << '\n';
  return kExitUnreachable;
}

// Sends one command and prints its return value.
int run_command(Client& client, const Output& output, const std::string& command, const json& arguments) {
  auto result = client.execute(command, arguments);
  output.print_events(client);
  if (!result) {
    // quit (and an exec live update) may close the connection before the
    // reply gets out: that is the command working, not failing.
    if (command == "quit") {
      std::cerr << "vmmctl: connection closed (the vmm is exiting)\n";
      return 0;
    }
    return unreachable(command + ": " + result.error().describe());
  }
  if (!*result) {
    std::cerr << "vmmctl: " << command << ": " << result->error().desc << " (" << result->error().error_class
              << ")\n";
    return kExitCommandFailed;
  }
  output.print(**result);
  return 0;
}

// A line the server ignores without a reply (see docs/control-protocol.md):
// sending one would only wait for an answer that never comes.
bool is_blank(std::string_view line) { return line.find_first_not_of(" \t\r") == std::string_view::npos; }

// Why vmmctl refuses to send `request` as a raw request, if it does.
std::optional<std::string> raw_request_problem(std::string_view request) {
  if (request == "-") return std::nullopt;
  if (is_blank(request))
    return "raw: the request is empty; the vmm answers no blank line. Give a JSON request such as "
           "'{\"execute\": \"query-status\"}', or - to read requests from stdin";
  if (request.find('\n') != std::string_view::npos)
    return "raw: the request holds a newline; give one request per line on stdin with 'raw -'";
  return std::nullopt;
}

// A raw guest-verify waits inside the vmm for up to its "timeout" seconds:
// seconds vmmctl must wait for its reply (nothing when it is no such request).
std::optional<double> raw_guest_verify_seconds(std::string_view request) {
  json parsed = json::parse(request, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_object()) return std::nullopt;
  auto execute = parsed.find("execute");
  if (execute == parsed.end() || *execute != "guest-verify") return std::nullopt;
  double seconds = 60.0;  // the vmm's default
  if (auto arguments = parsed.find("arguments"); arguments != parsed.end() && arguments->is_object())
    if (auto timeout = arguments->find("timeout"); timeout != arguments->end() && timeout->is_number())
      seconds = std::clamp(timeout->get<double>(), 0.0, 3600.0);
  return seconds;
}

// Sends each raw line verbatim and prints each whole reply (with its "id").
int run_raw(Client& client, const Output& output, const std::string& request) {
  auto send_one = [&](const std::string& line) -> std::optional<int> {
    auto reply = client.request_line(line);
    output.print_events(client);
    if (!reply) return unreachable(reply.error().describe());
    output.print(*reply);
    return reply->contains("error") ? kExitCommandFailed : 0;
  };
  if (request != "-") return *send_one(request);
  int status = 0;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (is_blank(line)) continue;
    int line_status = *send_one(line);
    if (line_status == kExitUnreachable) return line_status;
    if (line_status != 0) status = line_status;
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vmmctl: control a running vmm through its control socket"};
  app.require_subcommand(0, 1);

  std::string socket_path;
  Output output;
  double timeout_seconds = 30;
  std::string wait_event_name;
  app.add_option("-s,--socket", socket_path, "The vmm's control socket (every command but host-update and host-report)")
      ->envname("VMM_CONTROL_SOCKET");
  app.add_flag("--json", output.compact, "Print compact one-line JSON");
  app.add_flag("--events", output.show_events, "Also print events that arrive while waiting");
  CLI::Option* timeout_option =
      app.add_option("--timeout", timeout_seconds, "Seconds to wait for each reply or event")
          ->check(CLI::PositiveNumber);
  app.add_option("--wait-event", wait_event_name,
                 "Wait for this event (after running the command, if one is given) and print it");

  // Commands without arguments, by their vmmctl name.
  const std::map<std::string, std::string> simple_commands{
      {"status", "query-status"},  {"stop", "stop"},      {"cont", "cont"},
      {"memory", "query-memory"},  {"vcpus", "query-vcpus"}, {"guest", "query-guest"},
      {"quit", "quit"},           {"update-status", "query-live-update"},
  };
  const std::map<std::string, std::string> descriptions{
      {"status", "Run state (query-status)"},
      {"stop", "Pause the vCPUs"},
      {"cont", "Resume the vCPUs"},
      {"memory", "Guest memory regions (query-memory)"},
      {"vcpus", "vCPUs and their exit counts (query-vcpus)"},
      {"guest", "The test guest's progress (query-guest)"},
      {"quit", "Stop the vmm"},
      {"update-status", "Progress of a live update (query-live-update)"},
  };
  std::map<CLI::App*, std::string> subcommand_to_command;
  for (const auto& [name, command] : simple_commands)
    subcommand_to_command[app.add_subcommand(name, descriptions.at(name))] = command;

  CLI::App* verify = app.add_subcommand("verify", "Ask the guest to verify its memory stamps (guest-verify)");
  std::optional<double> guest_timeout_seconds;
  verify->add_option("--guest-timeout", guest_timeout_seconds,
                     "Seconds the vmm waits for the guest (the vmm's default: 60)")
      ->check(CLI::Range(0.001, 3600.0));

  CLI::App* live_update = app.add_subcommand("live-update", "Start a live update (live-update)");
  std::string mode = "exec";
  std::string binary;
  std::string kernel;
  std::string initrd;
  std::string cmdline;
  live_update->add_option("--mode", mode,
                          "transfer (new vmm process built before the pause), exec (new vmm binary in this "
                          "process) or kexec (new host kernel)")
      ->check(CLI::IsMember({"transfer", "exec", "kexec"}))
      ->capture_default_str();
  live_update->add_option("--binary", binary, "The new vmm binary (transfer and exec)");
  live_update->add_option("--kernel", kernel, "Host kernel for kexec");
  live_update->add_option("--initrd", initrd, "Host initrd for kexec");
  live_update->add_option("--cmdline", cmdline, "Host kernel command line for kexec");

  CLI::App* raw = app.add_subcommand("raw", "Send a request line verbatim; print the whole reply");
  std::string raw_request;
  raw->add_option("request", raw_request, "A JSON request, or - to read one per line from stdin")->required();

  // The whole host: every vmm with a control socket in one folder.
  vmm::tools::HostUpdateOptions host;
  double prepare_seconds = 300;
  double freeze_seconds = 30;
  CLI::App* host_update = app.add_subcommand(
      "host-update", "Upgrade the host kernel under every vmm in --dir: one kexec, every VM restored after it");
  host_update->add_option("--kernel", host.kernel, "The new kernel's image")->required();
  host_update->add_option("--initrd", host.initrd, "The new kernel's initrd");
  host_update->add_option("--cmdline", host.cmdline, "The new kernel's command line (default: the running one's)");
  host_update->add_option("--agent", host.agent_socket,
                          "The LUO agent whose registry tells the new kernel what to restore (default: "
                          "/run/vmm/luo-agent.sock when an agent answers there)");
  host_update->add_option("--prepare-timeout", prepare_seconds, "Seconds every VM has to prepare")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  host_update->add_option("--freeze-timeout", freeze_seconds, "Seconds every VM has to freeze, once all prepared")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  CLI::App* host_report =
      app.add_subcommand("host-report", "After a host update: each VM in --dir with its last update, the longest blackout");
  for (CLI::App* command : {host_update, host_report})
    command->add_option("--dir", host.socket_dir, "The folder of the vmms' control sockets")->capture_default_str();

  CLI11_PARSE(app, argc, argv);
  if (host_update->parsed() || host_report->parsed()) {
    spdlog::set_default_logger(spdlog::stderr_color_mt("vmmctl"));
    spdlog::set_pattern("[%H:%M:%S.%e] vmmctl %^%l%$: %v");
    if (host_report->parsed()) return vmm::tools::run_host_report(host.socket_dir, std::cout);
    host.prepare_timeout = std::chrono::milliseconds(static_cast<long long>(prepare_seconds * 1000.0));
    host.freeze_timeout = std::chrono::milliseconds(static_cast<long long>(freeze_seconds * 1000.0));
    return vmm::tools::run_host_update(host, std::cout);
  }
  if (socket_path.empty()) {
    std::cerr << "vmmctl: -s SOCKET (or $VMM_CONTROL_SOCKET) names the vmm's control socket\n";
    return kExitUnreachable;
  }

  const auto subcommands = app.get_subcommands();
  // guest-verify waits inside the vmm (60 s unless told otherwise): wait a
  // little longer than that for its reply.
  if (!subcommands.empty() && subcommands.front() == verify)
    timeout_seconds = std::max(timeout_seconds, guest_timeout_seconds.value_or(60.0) + 5.0);
  // A live update answers when it is over: a kexec loads a kernel first, and
  // a prepare on a busy host can take far longer than a query. Unless told,
  // wait as long as the vmm itself would let an update run.
  if (!subcommands.empty() && subcommands.front() == live_update && timeout_option->count() == 0)
    timeout_seconds = kLiveUpdateReplySeconds;
  if (!subcommands.empty() && subcommands.front() == raw) {
    // Refused before connecting: no reply would ever come.
    if (auto problem = raw_request_problem(raw_request)) {
      std::cerr << "vmmctl: " << *problem << '\n';
      return kExitUnreachable;
    }
    if (auto verify_seconds = raw_guest_verify_seconds(raw_request))
      timeout_seconds = std::max(timeout_seconds, *verify_seconds + 5.0);
  }
  const auto timeout =
      std::chrono::milliseconds(static_cast<long long>(timeout_seconds * 1000.0));
  if (subcommands.empty() && wait_event_name.empty()) {
    std::cerr << app.help();
    return kExitUnreachable;
  }

  auto connected = Client::connect(socket_path, timeout);
  if (!connected) return unreachable(connected.error().describe());
  Client client = std::move(*connected);
  if (auto negotiated = client.negotiate(); !negotiated) return unreachable(negotiated.error().describe());

  int status = 0;
  if (!subcommands.empty()) {
    CLI::App* chosen = subcommands.front();
    if (chosen == raw) {
      status = run_raw(client, output, raw_request);
    } else if (chosen == verify) {
      json arguments = json::object();
      if (guest_timeout_seconds) arguments["timeout"] = *guest_timeout_seconds;
      status = run_command(client, output, "guest-verify", arguments);
    } else if (chosen == live_update) {
      json arguments = json::object();
      arguments["mode"] = mode;
      if (!binary.empty()) arguments["binary"] = binary;
      if (!kernel.empty()) arguments["kernel"] = kernel;
      if (!initrd.empty()) arguments["initrd"] = initrd;
      if (!cmdline.empty()) arguments["cmdline"] = cmdline;
      status = run_command(client, output, "live-update", arguments);
    } else {
      status = run_command(client, output, subcommand_to_command.at(chosen), json::object());
    }
  }
  if (status != 0 || wait_event_name.empty()) return status;

  auto event = client.wait_event(wait_event_name, timeout);
  if (!event) return unreachable(event.error().describe());
  output.print_events(client);
  output.print(*event);
  return 0;
}

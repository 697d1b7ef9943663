// Fuzzes the real control::Server: each input is the bytes one client sends
// on a fresh connection to a listening socket (so negotiation, framing, the
// line limit and pipelining are all in play), after which the client shuts
// its write side and reads every reply until the server closes. The handler
// has the vmm's command table (vmm/commands.cc, and live-update's argument
// rules from update/live_update.cc) and checks the arguments the way they do,
// without a Machine.
//
// Invariants checked beyond the sanitizers: the server never dies or hangs,
// every line it sends is a JSON object that is a reply ("return" or
// "error") or the greeting, the handler only ever sees an object as
// arguments, and the server stops promptly at the end.
#include <poll.h>
#include <spdlog/sinks/null_sink.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/unique_fd.h"
#include "tests/fuzz/fuzz_driver.h"
#include "vmm/control/server.h"

namespace vmm::fuzz {
namespace {

using nlohmann::json;
using control::CommandError;
using control::CommandResult;

CommandResult generic_error(std::string desc) {
  return std::unexpected(CommandError{control::kGenericError, std::move(desc)});
}

// The vmm's commands with the arguments each accepts (vmm/commands.cc).
const std::map<std::string, std::vector<std::string>>& command_table() {
  static const std::map<std::string, std::vector<std::string>> table{
      {"query-status", {}},      {"stop", {}},        {"cont", {}},
      {"quit", {}},              {"query-memory", {}}, {"query-vcpus", {}},
      {"query-guest", {}},       {"guest-verify", {"timeout"}},
      {"query-memory-hash", {}}, {"query-live-update", {}},
      {"live-update", {"mode", "binary", "kernel", "initrd", "cmdline", "prefault", "x-inject"}},
  };
  return table;
}

class VmmShapedHandler final : public control::CommandHandler {
 public:
  CommandResult execute(const std::string& command, const json& arguments) override {
    return execute(command, arguments, control::CommandContext{});
  }

  CommandResult execute(const std::string& command, const json& arguments,
                        const control::CommandContext& context) override {
    if (!arguments.is_object()) fail("the handler got arguments that are not an object: " + arguments.dump());
    if (command == "qmp_capabilities") fail("the handler got qmp_capabilities, which the server handles");
    if (context.stop.stop_requested()) return generic_error("the vmm is shutting down");
    auto entry = command_table().find(command);
    if (entry == command_table().end())
      return std::unexpected(CommandError{control::kCommandNotFound, "The command " + command + " has not been found"});
    for (const auto& [key, value] : arguments.items())
      if (std::ranges::find(entry->second, key) == entry->second.end())
        return generic_error("Parameter '" + key + "' is unexpected for command " + command);
    if (command == "guest-verify") return guest_verify(arguments);
    if (command == "live-update") return live_update(arguments);
    // What the query commands return has the shape of the real replies;
    // echoing the id exercises serializing whatever the client sent.
    return json{{"status", "running"}, {"running", true}, {"id", context.id.value_or(json())}};
  }

 private:
  static CommandResult guest_verify(const json& arguments) {
    if (auto timeout = arguments.find("timeout"); timeout != arguments.end()) {
      if (!timeout->is_number() || timeout->get<double>() <= 0 || timeout->get<double>() > 3600)
        return generic_error("Parameter 'timeout' expects a number of seconds between 0 and 3600");
    }
    return json{{"pages_checked", 1}, {"mismatches", 0}, {"duration_us", 1}};
  }

  // LiveUpdate::parse's rules.
  static CommandResult live_update(const json& arguments) {
    for (const auto& [key, value] : arguments.items()) {
      if (key == "prefault" ? !value.is_boolean() : !value.is_string())
        return generic_error("Parameter '" + key + "' has the wrong type");
    }
    if (!arguments.contains("mode")) return generic_error("Parameter 'mode' is missing");
    const std::string mode = arguments["mode"].get<std::string>();
    if (mode != "exec" && mode != "kexec" && mode != "transfer")
      return generic_error("Parameter 'mode' is '" + mode + "'");
    if (mode == "kexec" && arguments.value("kernel", "").empty())
      return generic_error("Parameter 'kernel' is missing");
    return json{{"status", "failed"}, {"mode", mode}, {"error", "not in a fuzz run"}};
  }
};

// The server and its socket, for the whole run.
struct Fixture {
  std::string dir;
  std::string path;
  VmmShapedHandler handler;
  std::unique_ptr<control::Server> server;

  Fixture() {
    // Every log line the server writes is formatted (the formatting is part
    // of what runs on hostile input) and dropped.
    auto logger = std::make_shared<spdlog::logger>("fuzz", std::make_shared<spdlog::sinks::null_sink_mt>());
    logger->set_level(spdlog::level::trace);
    spdlog::set_default_logger(logger);
    char pattern[] = "/tmp/vmm-control-fuzz-XXXXXX";
    if (!::mkdtemp(pattern)) fail("mkdtemp failed");
    dir = pattern;
    path = dir + "/control.sock";
    auto listening = control::Server::listen(path, handler);
    if (!listening) fail("cannot start the server: " + listening.error().describe());
    server = std::move(*listening);
  }

  ~Fixture() {
    const auto before = std::chrono::steady_clock::now();
    server->stop();
    if (std::chrono::steady_clock::now() - before > std::chrono::seconds(2)) fail("Server::stop() took over 2 s");
    std::filesystem::remove_all(dir);
  }
};

Fixture* fixture = nullptr;

UniqueFd connect_client() {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  fixture->path.copy(address.sun_path, sizeof(address.sun_path) - 1);
  if (!fd || ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) < 0)
    fail("cannot connect to the server");
  return fd;
}

void check_line(std::string_view line, bool first) {
  if (line.ends_with('\r')) fail("the server sent a CR");
  json message = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!message.is_object()) fail("the server sent a line that is not a JSON object: " + std::string(line));
  if (first) {
    if (!message.contains("QMP")) fail("the first line is not the greeting: " + std::string(line));
    return;
  }
  const bool is_return = message.contains("return");
  const bool is_error = message.contains("error");
  if (is_return == is_error) fail("a reply must hold exactly one of return and error: " + std::string(line));
  if (is_error) {
    const json& error = message["error"];
    if (!error.is_object() || !error.contains("class") || !error["class"].is_string() || !error.contains("desc") ||
        !error["desc"].is_string() || error["desc"].get_ref<const std::string&>().empty())
      fail("an error reply without a class and a desc: " + std::string(line));
  }
  for (const auto& [key, value] : message.items())
    if (key != "return" && key != "error" && key != "id") fail("a reply with member '" + key + "': " + std::string(line));
}

// Sends `input`, closes the write side, reads to EOF (checking each line).
void fuzz_one(std::span<const uint8_t> input) {
  UniqueFd fd = connect_client();
  std::string_view unsent(reinterpret_cast<const char*>(input.data()), input.size());
  std::string received;
  size_t checked = 0;
  bool first = true;
  bool write_open = true;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (true) {
    if (write_open && unsent.empty()) {
      ::shutdown(fd.get(), SHUT_WR);
      write_open = false;
    }
    pollfd events{fd.get(), static_cast<short>(POLLIN | (write_open ? POLLOUT : 0)), 0};
    int ready = ::poll(&events, 1, 1000);
    if (std::chrono::steady_clock::now() > deadline) fail("the server did not finish with the connection in 20 s");
    if (ready <= 0) continue;
    if (write_open && (events.revents & POLLOUT)) {
      ssize_t sent = ::send(fd.get(), unsent.data(), unsent.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (sent > 0) unsent.remove_prefix(static_cast<size_t>(sent));
      // The server closed first (a line over the limit): it reads no more.
      else if (sent < 0 && errno != EAGAIN && errno != EINTR) unsent = {};
    }
    if (events.revents & (POLLIN | POLLHUP | POLLERR)) {
      char chunk[16384];
      ssize_t n = ::recv(fd.get(), chunk, sizeof chunk, MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno == ECONNRESET)) break;
      if (n > 0) received.append(chunk, static_cast<size_t>(n));
      for (size_t newline; (newline = received.find('\n', checked)) != std::string::npos; checked = newline + 1) {
        check_line(std::string_view(received).substr(checked, newline - checked), first);
        first = false;
      }
    }
  }
  if (checked != received.size()) fail("the server's last line has no newline");
  if (first) fail("the server sent no greeting");
}

// A request line with each kind of id.
std::string request(const std::string& execute, const std::string& arguments = "", const std::string& id = "") {
  std::string line = R"({"execute": )" + execute;
  if (!arguments.empty()) line += R"(, "arguments": )" + arguments;
  if (!id.empty()) line += R"(, "id": )" + id;
  return line + "}\n";
}

std::vector<Bytes> corpus() {
  const std::string negotiate = request(R"("qmp_capabilities")");
  const std::vector<std::string> ids = {"", "1", R"("a")", "null", "-1.5", "[1, {\"x\": []}]", R"({"seq": 3})",
                                        "true", "1e300", "18446744073709551615"};
  const std::vector<std::string> argument_values = {R"("exec")", R"("transfer")", R"("kexec")", "1", "0.5", "-1",
                                                    "3600", "3601", "true", "null", "[]", "{}", R"("/bin/true")"};
  std::vector<std::string> inputs;
  size_t id = 0;
  auto next_id = [&] { return ids[id++ % ids.size()]; };
  for (const auto& [name, allowed] : command_table()) {
    const std::string quoted = "\"" + name + "\"";
    inputs.push_back(negotiate + request(quoted, "", next_id()));
    inputs.push_back(negotiate + request(quoted, "{}", next_id()));
    inputs.push_back(negotiate + request(quoted, R"({"unknown": 1})", next_id()));
    inputs.push_back(request(quoted, "", next_id()));  // before negotiation
    for (const auto& argument : allowed)
      for (const auto& value : argument_values)
        inputs.push_back(negotiate + request(quoted, "{\"" + argument + "\": " + value + "}", next_id()));
  }
  inputs.push_back(negotiate + request(R"("live-update")", R"({"mode": "kexec", "kernel": "/k", "initrd": "/i", "cmdline": "a b"})", "7"));
  inputs.push_back(negotiate + request(R"("live-update")", R"({"mode": "transfer", "prefault": false, "x-inject": "target-crash"})"));
  inputs.push_back(negotiate + request(R"("no-such-command")", "", "2"));
  // Negotiation itself.
  inputs.push_back(request(R"("qmp_capabilities")", R"({"enable": []})", "1"));
  inputs.push_back(request(R"("qmp_capabilities")", R"({"enable": ["oob"]})"));
  inputs.push_back(request(R"("qmp_capabilities")", R"({"enable": {}})"));
  inputs.push_back(request(R"("qmp_capabilities")", R"({"other": 1})"));
  inputs.push_back(negotiate + negotiate);
  // Framing and shape.
  inputs.push_back(negotiate + "\r\n\n  \t\n" + request(R"("query-status")", "", "1") + "\r\n");
  inputs.push_back(negotiate + R"({"execute": "query-status", "exec-oob": 1})" "\n");
  inputs.push_back(negotiate + R"({"arguments": {}, "id": 1})" "\n");
  inputs.push_back(negotiate + R"({"execute": 1})" "\n" R"({"execute": "cont", "arguments": []})" "\n");
  inputs.push_back(negotiate + "[1, 2]\n42\nnull\n\"x\"\n");
  inputs.push_back(negotiate + R"({"execute": "query-status")");  // no newline
  inputs.push_back(negotiate + R"({"execute": "query-status", "id": "\u00e9\ud83d\ude00"})" "\n");
  std::string pipelined = negotiate;
  for (int i = 0; i < 20; ++i) pipelined += request(R"("query-status")", "", std::to_string(i));
  inputs.push_back(pipelined);
  inputs.push_back(negotiate + request(R"("stop")", "", std::string(40, '[') + std::string(40, ']')));

  std::vector<Bytes> out;
  for (const auto& input : inputs) out.push_back(to_bytes(input));
  return out;
}

std::vector<Bytes> dictionary() {
  std::vector<std::string> tokens = {"{", "}", "[", "]", ":", ",", "\"", "\"execute\"", "\"arguments\"", "\"id\"",
                                     "\"qmp_capabilities\"", "\"enable\"", "null", "true", "false", "\n", "\r\n",
                                     "\"timeout\"", "\"mode\"", "\"prefault\""};
  for (const auto& [name, allowed] : command_table()) tokens.push_back("\"" + name + "\"");
  std::vector<Bytes> out;
  for (const auto& token : tokens) out.push_back(to_bytes(token));
  return out;
}

}  // namespace
}  // namespace vmm::fuzz

int main(int argc, char** argv) {
  using namespace vmm::fuzz;
  Fixture server;
  fixture = &server;
  Target target;
  target.name = "control_server_fuzz";
  target.fuzz_one = fuzz_one;
  target.corpus = corpus();
  target.dictionary = dictionary();
  target.text = true;
  target.default_iterations = 100'000;
  target.default_time_cap = std::chrono::seconds(150);
  const int status = run(target, argc, argv);
  fixture = nullptr;
  return status;
}

// Fuzzes the LUO agent's request handling (update/luo_agent.cc) behind the
// control server's framing: each input is JSON lines, each line one request
// ({"execute": ..., "arguments": ...}) run on a fresh agent over a fake
// kernel (tests/update/fake_luo_kernel.h), so every command, argument shape
// and session name reaches the agent's checks and its session table.
//
// Invariants beyond the sanitizers: nothing throws; a success is a JSON
// object; create-session and retrieve-session succeed with exactly one open
// descriptor and fail with none; an error has a non-empty text; list-sessions
// always lists every session the agent reported as handed out and not
// released since.
#include <fcntl.h>
#include <spdlog/sinks/null_sink.h>
#include <spdlog/spdlog.h>

#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/fuzz/fuzz_driver.h"
#include "tests/update/fake_luo_kernel.h"
#include "update/luo_agent.h"

namespace vmm::fuzz {
namespace {

using nlohmann::json;

void run_request(LuoAgent& agent, const json& request, std::set<std::string>& held) {
  std::string command = "list-sessions";
  json arguments = json::object();
  if (request.is_object()) {
    if (auto it = request.find("execute"); it != request.end() && it->is_string()) command = it->get<std::string>();
    // The server passes only objects on (it refuses anything else).
    if (auto it = request.find("arguments"); it != request.end() && it->is_object()) arguments = *it;
  }
  std::vector<UniqueFd> fds;
  control::CommandContext context;
  context.peer_pid = 1234;
  context.reply_fds = &fds;
  control::CommandResult result = agent.execute(command, arguments, context);
  const bool hands_out = command == "create-session" || command == "retrieve-session";
  if (!result) {
    if (result.error().desc.empty()) fail("an error without a text for " + command);
    if (!fds.empty()) fail("an error reply with descriptors for " + command);
    return;
  }
  if (!result->is_object()) fail("a success that is not an object for " + command);
  if (hands_out) {
    if (fds.size() != 1 || ::fcntl(fds.front().get(), F_GETFD) < 0)
      fail("a successful " + command + " without exactly one open descriptor");
    held.insert((*result)["name"].get<std::string>());
  } else if (!fds.empty()) {
    fail(command + " handed out descriptors");
  }
  if (command == "release-session") held.erase((*result)["name"].get<std::string>());
  std::set<std::string> listed;
  const json list = agent.list();
  for (const auto& session : list.at("sessions")) listed.insert(session.at("name").get<std::string>());
  if (listed != held) fail("list-sessions does not match what was handed out and released");
}

void fuzz_one(std::span<const uint8_t> input) {
  testing::FakeLuoKernel kernel;
  kernel.incoming_available["vm"] = {1, 2};
  kernel.incoming_available["in"] = {3};
  testing::FakeLuoKernel::current() = &kernel;
  auto agent = LuoAgent::open("/dev/liveupdate", testing::FakeLuoKernel::syscalls());
  if (!agent) fail("the agent cannot start on the fake kernel: " + agent.error().describe());
  std::set<std::string> held;
  std::string_view text(reinterpret_cast<const char*>(input.data()), input.size());
  int requests = 0;
  try {
    while (!text.empty() && requests++ < 64) {
      const size_t newline = text.find('\n');
      const std::string_view line = text.substr(0, newline);
      text = newline == std::string_view::npos ? std::string_view() : text.substr(newline + 1);
      json request = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (request.is_discarded()) continue;  // the server answers these itself
      run_request(**agent, request, held);
    }
  } catch (const std::exception& error) {
    fail(std::string("the agent threw: ") + error.what());
  }
  agent->reset();
  testing::FakeLuoKernel::current() = nullptr;
}

std::vector<Bytes> corpus() {
  return {
      to_bytes("{\"execute\":\"hello\",\"arguments\":{\"protocol\":1}}\n"
               "{\"execute\":\"create-session\",\"arguments\":{\"name\":\"vm1\"}}\n"
               "{\"execute\":\"list-sessions\"}\n"
               "{\"execute\":\"release-session\",\"arguments\":{\"name\":\"vm1\"}}\n"),
      to_bytes("{\"execute\":\"retrieve-session\",\"arguments\":{\"name\":\"vm\"}}\n"
               "{\"execute\":\"retrieve-session\",\"arguments\":{\"name\":\"vm\"}}\n"
               "{\"execute\":\"create-session\",\"arguments\":{\"name\":\"vm\"}}\n"
               "{\"execute\":\"release-session\",\"arguments\":{\"name\":\"vm\"}}\n"),
      to_bytes("{\"execute\":\"create-session\",\"arguments\":{\"name\":\"a\",\"extra\":[1,{}]}}\n"
               "{\"execute\":\"hello\",\"arguments\":{\"protocol\":1e400}}\n"
               "{\"execute\":\"retrieve-session\",\"arguments\":{\"name\":\"in\"}}\n"),
  };
}

}  // namespace
}  // namespace vmm::fuzz

int main(int argc, char** argv) {
  using namespace vmm::fuzz;
  auto logger = std::make_shared<spdlog::logger>("fuzz", std::make_shared<spdlog::sinks::null_sink_mt>());
  logger->set_level(spdlog::level::trace);
  spdlog::set_default_logger(logger);
  Target target;
  target.name = "luo_agent_fuzz";
  target.fuzz_one = fuzz_one;
  target.corpus = corpus();
  target.dictionary = {to_bytes("\"execute\""), to_bytes("\"arguments\""), to_bytes("\"name\""),
                       to_bytes("\"protocol\""), to_bytes("create-session"), to_bytes("retrieve-session"),
                       to_bytes("release-session"), to_bytes("list-sessions"), to_bytes("hello"),
                       to_bytes("\"vm\""), to_bytes("\"in\""), to_bytes("\\u0000"), Bytes(70, 'n')};
  target.text = true;
  target.default_iterations = 100'000;
  target.default_time_cap = std::chrono::seconds(50);
  return run(target, argc, argv);
}

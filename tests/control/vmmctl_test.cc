// vmmctl end to end: the real binary against an in-process server with a
// fake handler.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

#include "vmm/control/server.h"

namespace vmm::control {
namespace {

using nlohmann::json;

class ScriptedHandler final : public CommandHandler {
 public:
  CommandResult execute(const std::string& command, const json& arguments) override {
    if (command == "query-status") return json{{"status", "running"}, {"running", true}};
    if (command == "stop") {
      std::function<void()> hook;
      {
        std::lock_guard lock(mutex_);
        hook = on_stop_;
      }
      if (hook) hook();
      return json::object();
    }
    if (command == "guest-verify") {
      std::chrono::milliseconds delay{};
      {
        std::lock_guard lock(mutex_);
        delay = guest_verify_delay_;
      }
      std::this_thread::sleep_for(delay);
      return arguments;
    }
    if (command == "live-update") {
      std::chrono::milliseconds delay{};
      {
        std::lock_guard lock(mutex_);
        delay = live_update_delay_;
      }
      std::this_thread::sleep_for(delay);
      return arguments;
    }
    if (command == "cont") return std::unexpected(CommandError{kGenericError, "the VM is not paused"});
    return std::unexpected(CommandError{kCommandNotFound, "The command " + command + " has not been found"});
  }
  // guest-verify takes this long before it replies.
  void delay_guest_verify(std::chrono::milliseconds delay) {
    std::lock_guard lock(mutex_);
    guest_verify_delay_ = delay;
  }
  // live-update takes this long before it replies.
  void delay_live_update(std::chrono::milliseconds delay) {
    std::lock_guard lock(mutex_);
    live_update_delay_ = delay;
  }
  // Runs inside "stop" (on a server thread), e.g. to emit an event.
  void on_stop(std::function<void()> hook) {
    std::lock_guard lock(mutex_);
    on_stop_ = std::move(hook);
  }

 private:
  std::mutex mutex_;
  std::function<void()> on_stop_;
  std::chrono::milliseconds guest_verify_delay_{};
  std::chrono::milliseconds live_update_delay_{};
};

struct VmmctlRun {
  int exit_status = -1;
  std::string output;  // stdout
  std::string errors;  // stderr
  std::chrono::steady_clock::duration took{};
};

class VmmctlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/vmmctl-test-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
    path_ = dir_ + "/control.sock";
    auto server = Server::listen(path_, handler_);
    ASSERT_TRUE(server) << server.error().describe();
    server_ = std::move(*server);
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  // Runs `vmmctl -s SOCKET ARGS` (ARGS as shell words), stdin from `input`.
  VmmctlRun vmmctl(const std::string& args, const std::string& input = "") {
    std::string input_file = dir_ + "/stdin";
    FILE* in = std::fopen(input_file.c_str(), "w");
    std::fputs(input.c_str(), in);
    std::fclose(in);
    std::string command = std::string(VMMCTL_PATH) + " -s " + path_ + " " + args + " <" + input_file + " 2>" + dir_ + "/stderr";
    VmmctlRun run;
    const auto started = std::chrono::steady_clock::now();
    FILE* pipe = ::popen(command.c_str(), "r");
    if (!pipe) return run;
    std::array<char, 4096> chunk{};
    while (std::size_t n = std::fread(chunk.data(), 1, chunk.size(), pipe)) run.output.append(chunk.data(), n);
    int status = ::pclose(pipe);
    run.took = std::chrono::steady_clock::now() - started;
    run.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::ifstream errors(dir_ + "/stderr");
    run.errors.assign(std::istreambuf_iterator<char>(errors), std::istreambuf_iterator<char>());
    return run;
  }

  std::string dir_;
  std::string path_;
  ScriptedHandler handler_;
  std::unique_ptr<Server> server_;
};

TEST_F(VmmctlTest, PrintsTheReturnValuePrettyOrCompact) {
  VmmctlRun pretty = vmmctl("status");
  EXPECT_EQ(pretty.exit_status, 0);
  EXPECT_EQ(pretty.output, "{\n  \"running\": true,\n  \"status\": \"running\"\n}\n");
  VmmctlRun compact = vmmctl("--json status");
  EXPECT_EQ(compact.exit_status, 0);
  EXPECT_EQ(compact.output, "{\"running\":true,\"status\":\"running\"}\n");
}

TEST_F(VmmctlTest, ErrorReplyExitsOne) {
  VmmctlRun run = vmmctl("cont");
  EXPECT_EQ(run.exit_status, 1);
  EXPECT_EQ(run.output, "");
}

TEST_F(VmmctlTest, UnreachableSocketExitsTwo) {
  std::string missing = dir_ + "/missing.sock";
  FILE* pipe = ::popen((std::string(VMMCTL_PATH) + " -s " + missing + " status 2>/dev/null").c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  int status = ::pclose(pipe);
  EXPECT_EQ(WEXITSTATUS(status), 2);
}

TEST_F(VmmctlTest, ArgumentsAreMapped) {
  EXPECT_EQ(vmmctl("--json verify --guest-timeout 2.5").output, "{\"timeout\":2.5}\n");
  EXPECT_EQ(vmmctl("--json live-update --mode kexec --kernel /k --initrd /i --cmdline 'a b'").output,
            "{\"cmdline\":\"a b\",\"initrd\":\"/i\",\"kernel\":\"/k\",\"mode\":\"kexec\"}\n");
  EXPECT_EQ(vmmctl("--json live-update").output, "{\"mode\":\"exec\"}\n");
  EXPECT_EQ(vmmctl("--json live-update --binary /new/vmm").output, "{\"binary\":\"/new/vmm\",\"mode\":\"exec\"}\n");
  EXPECT_EQ(vmmctl("--json update-status").exit_status, 1);  // not offered by this handler
}

TEST_F(VmmctlTest, RawPrintsWholeRepliesFromArgumentOrStdin) {
  VmmctlRun single = vmmctl(R"(--json raw '{"execute": "query-status", "id": 5}')");
  EXPECT_EQ(single.exit_status, 0);
  EXPECT_EQ(single.output, "{\"id\":5,\"return\":{\"running\":true,\"status\":\"running\"}}\n");

  VmmctlRun lines = vmmctl("--json raw -", "{\"execute\": \"stop\", \"id\": 1}\n\nnot json\n");
  EXPECT_EQ(lines.exit_status, 1);  // the second line failed
  std::istringstream replies(lines.output);
  std::string first, second;
  std::getline(replies, first);
  std::getline(replies, second);
  EXPECT_EQ(json::parse(first), (json{{"id", 1}, {"return", json::object()}}));
  EXPECT_EQ(json::parse(second)["error"]["class"], "GenericError");
}

// issue 10: the server answers no blank line, so `raw ''` waited the whole
// timeout (30 s) for nothing.
TEST_F(VmmctlTest, BlankRawRequestIsRefusedAtOnce) {
  using namespace std::chrono_literals;
  for (const char* request : {"''", "'   '", "\"$(printf ' \\t\\r')\""}) {
    VmmctlRun run = vmmctl(std::string("raw ") + request);
    EXPECT_EQ(run.exit_status, 2) << request;
    EXPECT_EQ(run.output, "") << request;
    EXPECT_LT(run.took, 5s) << request;
    EXPECT_NE(run.errors.find("vmmctl: raw: the request is empty"), std::string::npos) << run.errors;
  }
  VmmctlRun multi = vmmctl("raw \"$(printf '{}\\n{}')\"");
  EXPECT_EQ(multi.exit_status, 2);
  EXPECT_LT(multi.took, 5s);
  EXPECT_NE(multi.errors.find("holds a newline"), std::string::npos) << multi.errors;
}

// A raw guest-verify waits for its reply as long as the vmm may take.
TEST_F(VmmctlTest, RawGuestVerifyWaitsForItsOwnTimeout) {
  using namespace std::chrono_literals;
  handler_.delay_guest_verify(1500ms);
  VmmctlRun run = vmmctl(R"(--json --timeout 0.5 raw '{"execute": "guest-verify", "arguments": {"timeout": 2}}')");
  EXPECT_EQ(run.exit_status, 0) << run.errors;
  EXPECT_EQ(run.output, "{\"return\":{\"timeout\":2}}\n");
}

// live-update waits 600 s for its reply unless --timeout says otherwise
// (not tested: too slow); a given timeout is kept to.
TEST_F(VmmctlTest, LiveUpdateKeepsToAGivenTimeout) {
  using namespace std::chrono_literals;
  handler_.delay_live_update(1500ms);
  VmmctlRun told = vmmctl("--json --timeout 0.5 live-update --mode exec");
  EXPECT_EQ(told.exit_status, 2) << told.errors;
  EXPECT_LT(told.took, 1400ms);
  handler_.delay_live_update(0ms);
  VmmctlRun quick = vmmctl("--json live-update --mode exec");
  EXPECT_EQ(quick.exit_status, 0) << quick.errors;
  EXPECT_EQ(quick.output, "{\"mode\":\"exec\"}\n");
}

TEST_F(VmmctlTest, WaitsForAnEventAfterTheCommand) {
  Server* server = server_.get();  // not server_: TearDown resets it
  handler_.on_stop([server] { server->emit_event("STOP", json::object()); });
  VmmctlRun run = vmmctl("--json --timeout 5 --wait-event STOP stop");
  EXPECT_EQ(run.exit_status, 0);
  std::istringstream lines(run.output);
  std::string reply, event;
  std::getline(lines, reply);
  std::getline(lines, event);
  EXPECT_EQ(reply, "{}");
  EXPECT_EQ(json::parse(event)["event"], "STOP");
}

TEST_F(VmmctlTest, EventsArePrintedOnlyWhenAsked) {
  Server* server = server_.get();  // not server_: TearDown resets it
  handler_.on_stop([server] { server->emit_event("STOP", json::object()); });
  EXPECT_EQ(vmmctl("--json stop").output, "{}\n");
  VmmctlRun with_events = vmmctl("--json --events stop");
  std::istringstream lines(with_events.output);
  std::string event, reply;
  std::getline(lines, event);
  std::getline(lines, reply);
  EXPECT_EQ(json::parse(event)["event"], "STOP");
  EXPECT_EQ(reply, "{}");
}

}  // namespace
}  // namespace vmm::control

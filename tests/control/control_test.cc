// The control socket server and client against a fake CommandHandler: framing,
// negotiation, bad input, concurrency, events, socket lifecycle and handover.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "vmm/control/client.h"
#include "vmm/control/server.h"

namespace vmm::control {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

// echo returns its arguments; slow blocks until released; fail and throw fail.
class FakeHandler final : public CommandHandler {
 public:
  // whoami reports its context; pause-accepting calls Server::stop_accepting().
  CommandResult execute(const std::string& command, const json& arguments,
                        const CommandContext& context) override {
    if (command == "whoami")
      return json{{"connection_fd_valid", fcntl(context.connection_fd, F_GETFD) >= 0},
                  {"id", context.id.value_or("none")}};
    if (command == "pause-accepting") {
      server.load()->stop_accepting();
      return json::object();
    }
    if (command == "wait-for-stop") {
      // Like guest-verify: a long wait that must end when the server stops.
      std::mutex mutex;
      std::condition_variable_any never_notified;
      std::unique_lock lock(mutex);
      waiting_for_stop = true;
      bool stopped = never_notified.wait_for(lock, context.stop, 10s, [] { return false; });
      (void)stopped;
      if (context.stop.stop_requested())
        return std::unexpected(CommandError{kGenericError, "the vmm is shutting down"});
      return json{{"waited", "10 s"}};
    }
    return execute(command, arguments);
  }

  CommandResult execute(const std::string& command, const json& arguments) override {
    ++calls;
    if (command == "query-status") return json{{"status", "running"}, {"running", true}};
    if (command == "echo") return arguments;
    if (command == "fail") return std::unexpected(CommandError{kGenericError, "failed on purpose"});
    if (command == "throw") throw std::runtime_error("boom");
    if (command == "slow") {
      std::unique_lock lock(mutex_);
      slow_running = true;
      released_.wait_for(lock, 5s, [this] { return released_flag_; });
      return json{{"slow", true}};
    }
    return std::unexpected(CommandError{kCommandNotFound, "The command " + command + " has not been found"});
  }

  void release() {
    std::lock_guard lock(mutex_);
    released_flag_ = true;
    released_.notify_all();
  }

  std::atomic<int> calls{0};
  std::atomic<Server*> server{nullptr};
  std::atomic<bool> slow_running{false};
  std::atomic<bool> waiting_for_stop{false};

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  bool released_flag_ = false;
};

// Polls `condition` until it holds or two seconds pass.
template <class Condition>
bool eventually(Condition condition) {
  const auto deadline = std::chrono::steady_clock::now() + 2s;
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(2ms);
  }
  return condition();
}

// A bare connection, for clients that misbehave below the Client helper.
UniqueFd connect_raw(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  path.copy(address.sun_path, sizeof(address.sun_path) - 1);
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) < 0) return {};
  return fd;
}

// The next line on `fd`, or nullopt at end of stream, error or timeout.
std::optional<std::string> read_line_raw(FdRef fd, std::string& buffer,
                                         std::chrono::milliseconds timeout = 1s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    if (auto newline = buffer.find('\n'); newline != std::string::npos) {
      std::string line = buffer.substr(0, newline);
      buffer.erase(0, newline + 1);
      return line;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    pollfd readable{fd.get(), POLLIN, 0};
    if (left.count() <= 0 || ::poll(&readable, 1, static_cast<int>(left.count())) <= 0) return std::nullopt;
    char chunk[4096];
    ssize_t n = ::recv(fd.get(), chunk, sizeof chunk, 0);
    if (n <= 0) return std::nullopt;
    buffer.append(chunk, static_cast<std::size_t>(n));
  }
}

json error_json(const std::string& error_class, const std::string& desc) {
  return json{{"error", {{"class", error_class}, {"desc", desc}}}};
}

class ControlServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/vmm-control-test-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
    path_ = dir_ + "/control.sock";
  }

  void TearDown() override {
    handler_.release();
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  void start(ServerOptions options = {}) {
    auto server = Server::listen(path_, handler_, std::move(options));
    ASSERT_TRUE(server) << server.error().describe();
    server_ = std::move(*server);
    handler_.server = server_.get();
  }

  Client connect() {
    auto client = Client::connect(path_, 2s);
    EXPECT_TRUE(client) << client.error().describe();
    if (!client) throw std::runtime_error("connect failed");
    client->set_timeout(2s);
    return std::move(*client);
  }

  Client connect_negotiated() {
    Client client = connect();
    auto negotiated = client.negotiate();
    EXPECT_TRUE(negotiated) << negotiated.error().describe();
    return client;
  }

  json request_line(Client& client, std::string_view line) {
    auto reply = client.request_line(line);
    EXPECT_TRUE(reply) << reply.error().describe();
    return reply ? *reply : json();
  }

  // The server still serves: a fresh client can negotiate and query.
  void expect_still_serving() {
    Client other = connect_negotiated();
    auto status = other.execute("query-status");
    ASSERT_TRUE(status) << status.error().describe();
    ASSERT_TRUE(*status);
    EXPECT_EQ((**status)["status"], "running");
  }

  std::string dir_;
  std::string path_;
  FakeHandler handler_;
  std::unique_ptr<Server> server_;
};

TEST_F(ControlServerTest, GreetingHasQmpShape) {
  start();
  Client client = connect();
  EXPECT_EQ(client.greeting(), (json{{"QMP",
                                      {{"version", {{"vmm", {{"major", 0}, {"minor", 1}, {"micro", 0}}}, {"package", "vmm"}}},
                                       {"capabilities", json::array()}}}}));
}

TEST_F(ControlServerTest, CommandBeforeNegotiationIsRejected) {
  start();
  Client client = connect();
  EXPECT_EQ(request_line(client, R"({"execute": "query-status"})"),
            error_json("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"));
  EXPECT_EQ(handler_.calls, 0);
  EXPECT_EQ(request_line(client, R"({"execute": "qmp_capabilities"})"), (json{{"return", json::object()}}));
  EXPECT_EQ(request_line(client, R"({"execute": "query-status"})"),
            (json{{"return", {{"status", "running"}, {"running", true}}}}));
}

TEST_F(ControlServerTest, SecondNegotiationIsAnError) {
  start();
  Client client = connect_negotiated();
  EXPECT_EQ(request_line(client, R"({"execute": "qmp_capabilities", "id": 7})"),
            (json{{"error", {{"class", "CommandNotFound"},
                             {"desc", "Capabilities negotiation is already complete, command ignored"}}},
                  {"id", 7}}));
}

TEST_F(ControlServerTest, NegotiationAcceptsEmptyEnableAndRefusesCapabilities) {
  start();
  Client client = connect();
  json refused = request_line(client, R"({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})");
  EXPECT_EQ(refused["error"]["class"], "GenericError");
  EXPECT_EQ(request_line(client, R"({"execute": "qmp_capabilities", "arguments": {"enable": []}})"),
            (json{{"return", json::object()}}));
}

TEST_F(ControlServerTest, IdIsEchoedWhateverItsType) {
  start();
  Client client = connect_negotiated();
  for (const json& id : {json("abc"), json(42), json(-1.5), json{{"seq", 3}, {"tag", {1, 2}}}, json(nullptr)}) {
    json request{{"execute", "echo"}, {"arguments", {{"x", 1}}}, {"id", id}};
    EXPECT_EQ(request_line(client, request.dump()), (json{{"return", {{"x", 1}}}, {"id", id}})) << id.dump();
  }
  // Errors echo it too.
  EXPECT_EQ(request_line(client, R"({"execute": "fail", "id": "e1"})"),
            (json{{"error", {{"class", "GenericError"}, {"desc", "failed on purpose"}}}, {"id", "e1"}}));
}

TEST_F(ControlServerTest, MalformedJsonSaysWhere) {
  start();
  Client client = connect_negotiated();
  json reply = request_line(client, R"({"execute": "echo",, "id": 1})");
  ASSERT_TRUE(reply.contains("error")) << reply.dump();
  EXPECT_EQ(reply.size(), 1u);  // no id: the request never parsed
  EXPECT_EQ(reply["error"]["class"], "GenericError");
  std::string desc = reply["error"]["desc"];
  EXPECT_TRUE(desc.starts_with("JSON parse error at line 1, column 20")) << desc;
  EXPECT_EQ(handler_.calls, 0);
  // The same connection keeps working, and so do others.
  EXPECT_EQ(request_line(client, R"({"execute": "echo", "id": 2})"), (json{{"return", json::object()}, {"id", 2}}));
  expect_still_serving();
}

// The issue-10 crash: nlohmann throws out_of_range (not parse_error) for a
// number no double holds, and the server only caught parse_error: abort.
TEST_F(ControlServerTest, OverflowingNumberIsAParseErrorNotACrash) {
  start();
  Client client = connect();  // before negotiation too
  for (const char* line : {"1e400", R"({"execute": "qmp_capabilities", "id": 1e400})", "[-1e999]"}) {
    json reply = request_line(client, line);
    ASSERT_TRUE(reply.contains("error")) << line << " -> " << reply.dump();
    EXPECT_EQ(reply.size(), 1u) << reply.dump();  // no id: the request never parsed
    EXPECT_EQ(reply["error"]["class"], "GenericError");
    std::string desc = reply["error"]["desc"];
    EXPECT_TRUE(desc.starts_with("JSON parse error: number overflow parsing '")) << desc;
  }
  EXPECT_EQ(request_line(client, R"({"execute": "qmp_capabilities", "id": 1e300})"),
            (json{{"return", json::object()}, {"id", 1e300}}));
  EXPECT_EQ(handler_.calls, 0);
  expect_still_serving();
}

std::string nested_id_request(std::size_t id_depth) {
  return R"({"execute": "echo", "id": )" + std::string(id_depth, '[') + std::string(id_depth, ']') + "}";
}

TEST_F(ControlServerTest, NestingDeeperThanTheLimitIsRefusedBeforeParsing) {
  start();
  Client client = connect_negotiated();
  static_assert(kMaxRequestNesting == 64);
  // The request object is level 1: an id 63 arrays deep is the deepest allowed.
  json deepest = json::array();
  for (int level = 1; level < 63; ++level) deepest = json::array({deepest});
  EXPECT_EQ(request_line(client, nested_id_request(63)), (json{{"return", json::object()}, {"id", deepest}}));
  const std::string at = std::to_string(std::string(R"({"execute": "echo", "id": )").size() + 63);
  EXPECT_EQ(request_line(client, nested_id_request(64)),
            error_json("GenericError", "request nests arrays and objects deeper than 64 levels (at byte " + at + ")"));
  // As deep as a line can be: refused at once, no recursion per level.
  EXPECT_EQ(request_line(client, nested_id_request(32 * 1024 - 20))["error"]["class"], "GenericError");
  json enable = request_line(client, R"({"execute": "qmp_capabilities", "arguments": {"enable": )" +
                                         std::string(30000, '[') + std::string(30000, ']') + "}}");
  EXPECT_TRUE(enable["error"]["desc"].get<std::string>().starts_with("request nests arrays and objects deeper"))
      << enable.dump();
  EXPECT_EQ(handler_.calls, 1);  // only the allowed one
  expect_still_serving();
}

TEST_F(ControlServerTest, BracketsInStringsDoNotCountAsNesting) {
  start();
  Client client = connect_negotiated();
  const std::string brackets = std::string(100, '[') + "\\\"" + std::string(100, '{');
  json reply = request_line(client, R"({"execute": "echo", "arguments": {"s": ")" + brackets + R"("}, "id": 1})");
  EXPECT_EQ(reply, (json{{"return", {{"s", std::string(100, '[') + "\"" + std::string(100, '{')}}}, {"id", 1}}));
}

TEST_F(ControlServerTest, ParseErrorQuotingALongTokenIsTruncated) {
  start();
  Client client = connect_negotiated();
  json reply = request_line(client, R"({"execute": ")" + std::string(10000, 'x') + "\x01\"}");
  ASSERT_TRUE(reply.contains("error")) << reply.dump();
  std::string desc = reply["error"]["desc"];
  EXPECT_TRUE(desc.starts_with("JSON parse error at line 1")) << desc;
  EXPECT_TRUE(desc.ends_with("... (truncated)")) << desc;
  EXPECT_LT(desc.size(), 300u);
}

TEST_F(ControlServerTest, NonObjectIsRejected) {
  start();
  Client client = connect_negotiated();
  for (const char* line : {"[1, 2]", R"("execute")", "42", "null"})
    EXPECT_EQ(request_line(client, line), error_json("GenericError", "expected a JSON object")) << line;
  EXPECT_EQ(handler_.calls, 0);
  expect_still_serving();
}

TEST_F(ControlServerTest, MissingExecuteIsRejected) {
  start();
  Client client = connect_negotiated();
  EXPECT_EQ(request_line(client, R"({"arguments": {}, "id": 1})"),
            (json{{"error", {{"class", "GenericError"}, {"desc", "missing member 'execute'"}}}, {"id", 1}}));
  EXPECT_EQ(handler_.calls, 0);
  expect_still_serving();
}

TEST_F(ControlServerTest, NonStringExecuteIsRejected) {
  start();
  Client client = connect_negotiated();
  EXPECT_EQ(request_line(client, R"({"execute": ["echo"]})"),
            error_json("GenericError", "member 'execute' must be a string"));
  EXPECT_EQ(handler_.calls, 0);
  expect_still_serving();
}

TEST_F(ControlServerTest, NonObjectArgumentsAreRejected) {
  start();
  Client client = connect_negotiated();
  EXPECT_EQ(request_line(client, R"({"execute": "echo", "arguments": [1]})"),
            error_json("GenericError", "member 'arguments' must be an object"));
  EXPECT_EQ(handler_.calls, 0);
  expect_still_serving();
}

TEST_F(ControlServerTest, UnknownTopLevelMemberIsRejected) {
  start();
  Client client = connect_negotiated();
  EXPECT_EQ(request_line(client, R"({"execute": "echo", "exec-oob": "x", "id": 3})"),
            (json{{"error",
                   {{"class", "GenericError"},
                    {"desc", "unknown member 'exec-oob' (a request has 'execute', 'arguments' and 'id')"}}},
                  {"id", 3}}));
  EXPECT_EQ(handler_.calls, 0);
  expect_still_serving();
}

TEST_F(ControlServerTest, UnknownCommandErrorComesFromHandler) {
  start();
  Client client = connect_negotiated();
  EXPECT_EQ(request_line(client, R"({"execute": "no-such-command"})"),
            error_json("CommandNotFound", "The command no-such-command has not been found"));
  expect_still_serving();
}

TEST_F(ControlServerTest, ThrowingHandlerBecomesGenericError) {
  start();
  Client client = connect_negotiated();
  EXPECT_EQ(request_line(client, R"({"execute": "throw"})"),
            error_json("GenericError", "internal error in throw: boom"));
  expect_still_serving();
}

TEST_F(ControlServerTest, OverlongLineGetsErrorThenClose) {
  start();
  Client client = connect_negotiated();
  std::string line(64 * 1024 + 1, ' ');
  line.front() = '{';
  line.back() = '}';
  line += '\n';
  ASSERT_TRUE(client.send_raw(line));
  auto reply = client.read_message();
  ASSERT_TRUE(reply) << reply.error().describe();
  EXPECT_EQ(*reply, error_json("GenericError", "request line longer than 65536 bytes; closing the connection"));
  EXPECT_FALSE(client.read_message());  // closed
  EXPECT_EQ(handler_.calls, 0);
  expect_still_serving();
}

TEST_F(ControlServerTest, LineOfExactlyTheLimitIsServed) {
  start();
  Client client = connect_negotiated();
  std::string request = R"({"execute": "echo", "id": "big")";
  std::string line = request + std::string(64 * 1024 - request.size() - 1, ' ') + "}";
  ASSERT_EQ(line.size(), 64u * 1024);
  EXPECT_EQ(request_line(client, line), (json{{"return", json::object()}, {"id", "big"}}));
}

TEST_F(ControlServerTest, SeveralCommandsInOneWriteRunInOrder) {
  start();
  Client client = connect_negotiated();
  ASSERT_TRUE(client.send_raw(R"({"execute": "echo", "arguments": {"n": 1}, "id": 1})" "\n"
                              R"({"execute": "fail", "id": 2})" "\n"
                              R"({"execute": "echo", "arguments": {"n": 3}, "id": 3})" "\n"));
  for (int id = 1; id <= 3; ++id) {
    auto reply = client.read_reply();
    ASSERT_TRUE(reply) << reply.error().describe();
    EXPECT_EQ((*reply)["id"], id);
  }
}

TEST_F(ControlServerTest, CrlfAndEmptyLinesAreTolerated) {
  start();
  Client client = connect_negotiated();
  ASSERT_TRUE(client.send_raw("\n\r\n   \n" R"({"execute": "echo", "id": 1})" "\r\n\n"
                              R"({"execute": "echo", "id": 2})" "\r\n"));
  auto first = client.read_reply();
  auto second = client.read_reply();
  ASSERT_TRUE(first && second);
  EXPECT_EQ(*first, (json{{"return", json::object()}, {"id", 1}}));
  EXPECT_EQ(*second, (json{{"return", json::object()}, {"id", 2}}));
  EXPECT_EQ(handler_.calls, 2);
}

TEST_F(ControlServerTest, ClientsBeyondTheCapAreTurnedAway) {
  start();
  std::vector<Client> admitted;
  for (int i = 0; i < 16; ++i) admitted.push_back(connect_negotiated());
  for (int i = 0; i < 4; ++i) {
    UniqueFd extra = connect_raw(path_);
    ASSERT_TRUE(extra);
    std::string buffer;
    auto line = read_line_raw(extra.ref(), buffer);
    ASSERT_TRUE(line);
    EXPECT_EQ(json::parse(*line), error_json("GenericError", "too many clients (limit 16); try again later"));
    EXPECT_FALSE(read_line_raw(extra.ref(), buffer));  // and closed
  }
  auto refused = Client::connect(path_, 1s);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("too many clients"), std::string::npos) << refused.error().message;
  // Every admitted client still works, independently.
  for (auto& client : admitted) {
    auto status = client.execute("query-status");
    ASSERT_TRUE(status && *status);
  }
  // A slot freed is a slot reused.
  admitted.pop_back();
  ASSERT_TRUE(eventually([&] { return server_->client_count() == 15; }));
  expect_still_serving();
}

TEST_F(ControlServerTest, SilentClientBlocksNobody) {
  start();
  UniqueFd silent = connect_raw(path_);
  ASSERT_TRUE(silent);
  UniqueFd half_negotiated = connect_raw(path_);
  ASSERT_TRUE(half_negotiated);
  const char* partial = R"({"execute": "qmp_capa)";
  ASSERT_GT(::send(half_negotiated.get(), partial, strlen(partial), MSG_NOSIGNAL), 0);
  expect_still_serving();
  const auto before = std::chrono::steady_clock::now();
  server_->stop();
  EXPECT_LT(std::chrono::steady_clock::now() - before, 1s);
  std::string buffer;
  ASSERT_TRUE(read_line_raw(silent.ref(), buffer));  // the greeting
  EXPECT_FALSE(read_line_raw(silent.ref(), buffer));  // then closed at shutdown
}

TEST_F(ControlServerTest, DisconnectMidLineExecutesNothing) {
  start();
  {
    Client client = connect_negotiated();
    ASSERT_TRUE(client.send_raw(R"({"execute": "echo", "id": 1})"));  // no newline
  }
  ASSERT_TRUE(eventually([&] { return server_->client_count() == 0; }));
  EXPECT_EQ(handler_.calls, 0);
  expect_still_serving();
}

TEST_F(ControlServerTest, EventsReachNegotiatedClientsOnly) {
  start();
  Client negotiated = connect_negotiated();
  Client not_yet = connect();
  server_->emit_event("STOP", json::object());
  auto event = negotiated.wait_event("STOP", 2s);
  ASSERT_TRUE(event) << event.error().describe();
  ASSERT_EQ(event->size(), 3u) << event->dump();
  EXPECT_EQ((*event)["event"], "STOP");
  EXPECT_EQ((*event)["data"], json::object());
  const json& timestamp = (*event)["timestamp"];
  ASSERT_EQ(timestamp.size(), 2u);
  ASSERT_TRUE(timestamp["seconds"].is_number_integer());
  ASSERT_TRUE(timestamp["microseconds"].is_number_integer());
  EXPECT_GE(timestamp["microseconds"].get<int64_t>(), 0);
  EXPECT_LT(timestamp["microseconds"].get<int64_t>(), 1'000'000);
  const auto now = std::chrono::duration_cast<std::chrono::seconds>(
                       std::chrono::system_clock::now().time_since_epoch()).count();
  EXPECT_LE(std::abs(timestamp["seconds"].get<int64_t>() - now), 5);

  // Had STOP gone to the unnegotiated client, it would come before this reply.
  not_yet.set_timeout(200ms);
  auto reply = not_yet.read_message();
  ASSERT_FALSE(reply);  // nothing at all arrives
  not_yet.set_timeout(2s);
  ASSERT_TRUE(not_yet.send_raw(R"({"execute": "qmp_capabilities"})" "\n"));
  auto negotiation = not_yet.read_message();
  ASSERT_TRUE(negotiation);
  EXPECT_EQ(*negotiation, (json{{"return", json::object()}}));

  server_->emit_event("RESUME", {{"reason", "test"}});
  for (Client* client : {&negotiated, &not_yet}) {
    auto resume = client->wait_event("RESUME", 2s);
    ASSERT_TRUE(resume) << resume.error().describe();
    EXPECT_EQ((*resume)["data"], (json{{"reason", "test"}}));
  }
}

TEST_F(ControlServerTest, EventsWaitingDuringACommandAreKeptAside) {
  start();
  Client client = connect_negotiated();
  server_->emit_event("SHUTDOWN", {{"guest", true}});
  auto status = client.execute("query-status");
  ASSERT_TRUE(status && *status);
  auto events = client.take_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0]["event"], "SHUTDOWN");
}

TEST_F(ControlServerTest, ClientThatStopsReadingIsDroppedNotWaitedOn) {
  ServerOptions options;
  options.max_pending_output_bytes = 64 * 1024;
  start(options);
  Client stalled = connect_negotiated();
  const json payload{{"padding", std::string(1024, 'x')}};
  // Up to ~2 MiB: far more than the socket buffer (~200 KiB) plus 64 KiB.
  const auto before = std::chrono::steady_clock::now();
  for (int i = 0; i < 2000 && server_->client_count() > 0; ++i) server_->emit_event("NOISE", payload);
  EXPECT_LT(std::chrono::steady_clock::now() - before, 2s);
  ASSERT_TRUE(eventually([&] { return server_->client_count() == 0; }));
  expect_still_serving();
}

TEST_F(ControlServerTest, SlowCommandBlocksOnlyItsOwnClient) {
  start();
  Client slow = connect_negotiated();
  ASSERT_TRUE(slow.send_raw(R"({"execute": "slow", "id": "s"})" "\n"));
  ASSERT_TRUE(eventually([&] { return handler_.slow_running.load(); }));
  Client fast = connect_negotiated();
  auto status = fast.execute("query-status");
  ASSERT_TRUE(status && *status);
  handler_.release();
  auto reply = slow.read_reply();
  ASSERT_TRUE(reply);
  EXPECT_EQ(*reply, (json{{"return", {{"slow", true}}}, {"id", "s"}}));
}

TEST_F(ControlServerTest, SocketIsMode0600WhateverTheUmask) {
  mode_t old_umask = ::umask(0);
  start();
  ::umask(old_umask);
  struct stat file{};
  ASSERT_EQ(::stat(path_.c_str(), &file), 0);
  EXPECT_TRUE(S_ISSOCK(file.st_mode));
  EXPECT_EQ(file.st_mode & 07777, 0600u);
}

TEST_F(ControlServerTest, ExistingPathIsRefusedAndLeftAlone) {
  { std::ofstream(path_) << "not yours"; }
  auto server = Server::listen(path_, handler_);
  ASSERT_FALSE(server);
  EXPECT_EQ(server.error().message, "control socket path " + path_ +
                                        " already exists (is another vmm running? remove it if stale)");
  std::ifstream kept(path_);
  std::string content;
  std::getline(kept, content);
  EXPECT_EQ(content, "not yours");
}

TEST_F(ControlServerTest, SecondServerOnALiveSocketIsRefused) {
  start();
  auto second = Server::listen(path_, handler_);
  ASSERT_FALSE(second);
  EXPECT_NE(second.error().message.find("already exists"), std::string::npos);
  expect_still_serving();
}

// The check a restore makes before it takes a VM's session refuses what
// listen() would, in the same words, and creates nothing.
TEST_F(ControlServerTest, ListenPathCheckRefusesWhatListenWouldAndCreatesNothing) {
  const std::string fresh = dir_ + "/fresh.sock";
  ASSERT_TRUE(Server::check_listen_path(fresh));
  struct stat file{};
  EXPECT_NE(::lstat(fresh.c_str(), &file), 0) << "the check created " << fresh;

  auto missing = Server::check_listen_path(dir_ + "/no/such/dir/control.sock");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().message, "control socket directory " + dir_ + "/no/such/dir does not exist (create it first)");

  start();
  auto taken = Server::check_listen_path(path_);
  ASSERT_FALSE(taken);
  EXPECT_EQ(taken.error().code, EADDRINUSE);
  EXPECT_NE(taken.error().message.find("already exists"), std::string::npos) << taken.error().message;
  expect_still_serving();

  auto too_long = Server::check_listen_path(dir_ + "/" + std::string(120, 'x'));
  ASSERT_FALSE(too_long);
  EXPECT_NE(too_long.error().message.find("is too long"), std::string::npos) << too_long.error().message;
}

TEST_F(ControlServerTest, MissingDirectoryAndLongPathAreClearErrors) {
  auto missing = Server::listen(dir_ + "/no/such/dir/control.sock", handler_);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().message, "control socket directory " + dir_ + "/no/such/dir does not exist (create it first)");

  std::string long_path = dir_ + "/" + std::string(120, 'x');
  auto too_long = Server::listen(long_path, handler_);
  ASSERT_FALSE(too_long);
  EXPECT_NE(too_long.error().message.find("is too long"), std::string::npos) << too_long.error().message;
  EXPECT_NE(too_long.error().message.find("at most 107"), std::string::npos) << too_long.error().message;
}

TEST_F(ControlServerTest, StopRemovesThePath) {
  start();
  ASSERT_TRUE(std::filesystem::exists(path_));
  server_->stop();
  EXPECT_FALSE(std::filesystem::exists(path_));
  EXPECT_FALSE(Client::connect(path_, 1s));
}

TEST_F(ControlServerTest, StopLeavesAPathThatIsNoLongerOurs) {
  start();
  std::filesystem::remove(path_);
  { std::ofstream(path_) << "someone else's"; }
  server_->stop();
  EXPECT_TRUE(std::filesystem::exists(path_));
}

TEST_F(ControlServerTest, DetachThenAdoptServesWithoutRefusingAnyone) {
  start();
  Client before = connect_negotiated();
  UniqueFd handed_over = server_->detach();
  ASSERT_TRUE(handed_over);
  server_.reset();
  ASSERT_TRUE(std::filesystem::exists(path_));  // detach leaves the path
  EXPECT_FALSE(before.read_message());         // its clients are closed

  // Connecting during the handover gap succeeds: the kernel queues it.
  UniqueFd waiting = connect_raw(path_);
  ASSERT_TRUE(waiting);

  auto adopted = Server::adopt(std::move(handed_over), path_, handler_);
  ASSERT_TRUE(adopted) << adopted.error().describe();
  server_ = std::move(*adopted);
  std::string buffer;
  auto greeting = read_line_raw(waiting.ref(), buffer);
  ASSERT_TRUE(greeting);
  EXPECT_TRUE(json::parse(*greeting).contains("QMP"));
  expect_still_serving();

  server_->stop();
  EXPECT_FALSE(std::filesystem::exists(path_));  // the adopter owns the path
}

TEST_F(ControlServerTest, AdoptRefusesWhatIsNotTheListeningSocket) {
  start();
  UniqueFd not_listening(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  auto refused = Server::adopt(std::move(not_listening), path_, handler_);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("is not listening"), std::string::npos) << refused.error().message;

  UniqueFd handed_over = server_->detach();
  auto wrong_path = Server::adopt(std::move(handed_over), dir_ + "/other.sock", handler_);
  ASSERT_FALSE(wrong_path);
  EXPECT_NE(wrong_path.error().message.find("is bound to"), std::string::npos) << wrong_path.error().message;
  EXPECT_TRUE(std::filesystem::exists(path_));
}

// issue 10: a long command (guest-verify waits up to an hour) held stop(),
// and so quit, SIGTERM and the old process of a transfer, for as long.
TEST_F(ControlServerTest, StopEndsALongCommandThroughItsStopToken) {
  start();
  Client waiting = connect_negotiated();
  ASSERT_TRUE(waiting.send_raw(R"({"execute": "wait-for-stop", "id": "w"})" "\n"));
  ASSERT_TRUE(eventually([&] { return handler_.waiting_for_stop.load(); }));
  const auto before = std::chrono::steady_clock::now();
  server_->stop();
  EXPECT_LT(std::chrono::steady_clock::now() - before, 1s);
  // The command's reply still goes out, then the connection closes.
  auto reply = waiting.read_message();
  ASSERT_TRUE(reply) << reply.error().describe();
  EXPECT_EQ(*reply, (json{{"error", {{"class", "GenericError"}, {"desc", "the vmm is shutting down"}}}, {"id", "w"}}));
  EXPECT_FALSE(waiting.read_message());
}

TEST_F(ControlServerTest, DetachAlsoEndsLongCommands) {
  start();
  Client waiting = connect_negotiated();
  ASSERT_TRUE(waiting.send_raw(R"({"execute": "wait-for-stop"})" "\n"));
  ASSERT_TRUE(eventually([&] { return handler_.waiting_for_stop.load(); }));
  const auto before = std::chrono::steady_clock::now();
  UniqueFd released = server_->detach();
  EXPECT_LT(std::chrono::steady_clock::now() - before, 1s);
  EXPECT_TRUE(released);
}

TEST_F(ControlServerTest, StopIsPromptAndIdempotent) {
  start();
  std::vector<Client> clients;
  for (int i = 0; i < 5; ++i) clients.push_back(connect_negotiated());
  const auto before = std::chrono::steady_clock::now();
  server_->stop();
  server_->stop();
  EXPECT_LT(std::chrono::steady_clock::now() - before, 1s);
  for (auto& client : clients) EXPECT_FALSE(client.read_message());
  server_->emit_event("AFTER_STOP");  // harmless
  EXPECT_FALSE(server_->detach());
}

TEST_F(ControlServerTest, HandlerSeesTheConnectionAndTheId) {
  start();
  Client client = connect_negotiated();
  EXPECT_EQ(request_line(client, R"({"execute": "whoami", "id": {"n": 9}})"),
            (json{{"return", {{"connection_fd_valid", true}, {"id", {{"n", 9}}}}}, {"id", {{"n", 9}}}}));
  EXPECT_EQ(request_line(client, R"({"execute": "whoami"})"),
            (json{{"return", {{"connection_fd_valid", true}, {"id", "none"}}}}));
}

TEST_F(ControlServerTest, StopAcceptingFromAHandlerQueuesNewConnections) {
  start();
  Client client = connect_negotiated();
  auto paused = client.execute("pause-accepting");  // from a handler: must not deadlock
  ASSERT_TRUE(paused && *paused);
  UniqueFd waiting = connect_raw(path_);
  ASSERT_TRUE(waiting);  // queued in the backlog, not refused
  std::string buffer;
  EXPECT_FALSE(read_line_raw(waiting.ref(), buffer, 200ms));  // not served yet
  auto status = client.execute("query-status");            // connected clients still are
  ASSERT_TRUE(status && *status);
  ASSERT_TRUE(server_->resume_accepting());
  auto greeting = read_line_raw(waiting.ref(), buffer);
  ASSERT_TRUE(greeting);
  EXPECT_TRUE(json::parse(*greeting).contains("QMP"));
}

TEST_F(ControlServerTest, StopWhileNotAcceptingIsPrompt) {
  start();
  server_->stop_accepting();
  const auto before = std::chrono::steady_clock::now();
  server_->stop();
  EXPECT_LT(std::chrono::steady_clock::now() - before, 1s);
  EXPECT_FALSE(std::filesystem::exists(path_));
  EXPECT_FALSE(server_->resume_accepting());
}

TEST_F(ControlServerTest, HandedOverClientGetsItsReplyFirstAndStaysNegotiated) {
  start();
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd ours(pair[1]);
  const json owed{{"return", {{"updated", true}}}, {"id", "lu-1"}};
  server_->adopt_client(UniqueFd(pair[0]), owed);
  std::string buffer;
  auto first = read_line_raw(ours.ref(), buffer);
  ASSERT_TRUE(first);
  EXPECT_EQ(json::parse(*first), owed);
  EXPECT_EQ(server_->client_count(), 1u);

  const std::string request = R"({"execute": "query-status", "id": 2})" "\n";
  ASSERT_EQ(::send(ours.get(), request.data(), request.size(), MSG_NOSIGNAL), static_cast<ssize_t>(request.size()));
  auto reply = read_line_raw(ours.ref(), buffer);
  ASSERT_TRUE(reply);
  EXPECT_EQ(json::parse(*reply), (json{{"return", {{"status", "running"}, {"running", true}}}, {"id", 2}}));
  server_->emit_event("RESUME");
  auto event = read_line_raw(ours.ref(), buffer);
  ASSERT_TRUE(event);
  EXPECT_EQ(json::parse(*event)["event"], "RESUME");
}

TEST_F(ControlServerTest, HandedOverClientAfterStopIsClosed) {
  start();
  server_->stop();
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd ours(pair[1]);
  server_->adopt_client(UniqueFd(pair[0]), json{{"return", json::object()}});
  std::string buffer;
  EXPECT_FALSE(read_line_raw(ours.ref(), buffer));
}

// A server that sends the scripted lines: the greeting at once, then one
// line (or several) per request line it reads.
class ScriptedPeer {
 public:
  ScriptedPeer(const std::string& path, std::string greeting, std::vector<std::string> replies) {
    listen_fd_ = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    path.copy(address.sun_path, sizeof(address.sun_path) - 1);
    if (::bind(listen_fd_.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) < 0 ||
        ::listen(listen_fd_.get(), 1) < 0)
      throw std::runtime_error("cannot listen");
    thread_ = std::thread([this, greeting = std::move(greeting), replies = std::move(replies)] {
      UniqueFd connection(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      auto send_line = [&](const std::string& line) {
        std::string framed = line + "\n";
        [[maybe_unused]] auto sent = ::send(connection.get(), framed.data(), framed.size(), MSG_NOSIGNAL);
      };
      send_line(greeting);
      std::string buffer;
      for (const auto& reply : replies) {
        if (!read_line_raw(connection.ref(), buffer, 2s)) return;
        send_line(reply);
      }
      read_line_raw(connection.ref(), buffer, 2s);  // until the client leaves
    });
  }
  ~ScriptedPeer() { thread_.join(); }

 private:
  UniqueFd listen_fd_;
  std::thread thread_;
};

class ControlClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/vmm-control-client-test-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

// What a server sends is checked before it is read: members of the wrong
// type used to throw nlohmann::type_error out of the client (and vmmctl).
TEST_F(ControlClientTest, MalformedServerLinesAreErrorsNotExceptions) {
  const std::string path = dir_ + "/peer.sock";
  ScriptedPeer peer(path, R"({"QMP": {}})",
                    {R"({"error": "not an object"})", R"({"error": {"class": 5, "desc": ["x"]}})",
                     R"({"event": 7})" "\n" R"({"return": 1})", "[1]"});
  auto client = Client::connect(path, 2s);
  ASSERT_TRUE(client) << client.error().describe();
  client->set_timeout(2s);

  auto not_object = client->execute("a");
  ASSERT_TRUE(not_object) << not_object.error().describe();
  ASSERT_FALSE(*not_object);
  EXPECT_EQ(not_object->error().error_class, "GenericError");
  EXPECT_EQ(not_object->error().desc, R"("not an object")");

  auto wrong_types = client->execute("b");
  ASSERT_TRUE(wrong_types) << wrong_types.error().describe();
  ASSERT_FALSE(*wrong_types);
  EXPECT_EQ(wrong_types->error().error_class, "GenericError");
  EXPECT_EQ(wrong_types->error().desc, R"({"class":5,"desc":["x"]})");

  auto after_odd_event = client->execute("c");
  ASSERT_TRUE(after_odd_event && *after_odd_event);
  EXPECT_EQ(**after_odd_event, 1);
  EXPECT_FALSE(client->wait_event("STOP", 100ms));  // the kept event has no string name: no match, no throw

  auto array = client->execute("d");
  ASSERT_FALSE(array);
  EXPECT_EQ(array.error().message, "reply to d is not a JSON object: [1]");
}

TEST_F(ControlClientTest, RefusalWhoseErrorIsNotAnObjectIsStillAClearError) {
  const std::string path = dir_ + "/peer.sock";
  ScriptedPeer peer(path, R"({"error": 42})", {});
  auto client = Client::connect(path, 2s);
  ASSERT_FALSE(client);
  EXPECT_EQ(client.error().message, "the server at " + path + " refused the connection: 42");
}

}  // namespace
}  // namespace vmm::control

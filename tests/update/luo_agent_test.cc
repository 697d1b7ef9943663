// The LUO session agent over a real Unix socket, with a fake kernel behind
// it (fake_luo_kernel.h): the protocol's round trips, who holds a session
// when (a client closing its descriptor or dying loses nothing), retrieving
// twice, and every kind of bad request.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "tests/update/agent_fixture.h"
#include "tests/update/fake_luo_kernel.h"
#include "update/agent_backend.h"
#include "update/luo_agent.h"
#include "vmm/control/client.h"
#include "vmm/control/server.h"

namespace vmm {
namespace {

using nlohmann::json;
using testing::FakeLuoKernel;

ino_t inode_of(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
}

// The entry list-sessions gives for `name`, if any.
std::optional<json> find_session(const json& list, const std::string& name) {
  for (const auto& session : list.at("sessions"))
    if (session.at("name") == name) return session;
  return std::nullopt;
}

class LuoAgentTest : public testing::FakeKernelAgentTest {
 protected:
  json list() { return agent_->list(); }

};

TEST_F(LuoAgentTest, OpensTheDeviceOnceForEveryClient) {
  auto first = backend();
  auto second = backend();
  ASSERT_TRUE(first && second);
  auto a = first->create_session("vm-a");
  auto b = second->create_session("vm-b");
  ASSERT_TRUE(a) << a.error().describe();
  ASSERT_TRUE(b) << b.error().describe();
  EXPECT_EQ(kernel_.device_opens, 1);
}

TEST_F(LuoAgentTest, GreetingAndHelloNameTheProtocol) {
  auto client = control::Client::connect(path_);
  ASSERT_TRUE(client) << client.error().describe();
  EXPECT_EQ(client->greeting()["QMP"]["version"]["luo-agent"]["protocol"], kLuoAgentProtocol);
  ASSERT_TRUE(client->negotiate());
  auto hello = client->execute("hello", json{{"protocol", kLuoAgentProtocol}});
  ASSERT_TRUE(hello && *hello);
  EXPECT_EQ((**hello)["protocol"], kLuoAgentProtocol);
  EXPECT_EQ((**hello)["pid"], ::getpid());

  auto newer = client->execute("hello", json{{"protocol", kLuoAgentProtocol + 1}});
  ASSERT_TRUE(newer);
  ASSERT_FALSE(*newer) << "an unknown protocol must be refused";
  EXPECT_NE(newer->error().desc.find("speaks protocol 1"), std::string::npos) << newer->error().desc;
  auto missing = client->execute("hello");
  ASSERT_TRUE(missing);
  EXPECT_FALSE(*missing);
}

TEST_F(LuoAgentTest, CreateSessionHandsOutTheSessionAndKeepsItsOwn) {
  auto luo = backend();
  ASSERT_TRUE(luo);
  auto session = luo->create_session("vm1");
  ASSERT_TRUE(session) << session.error().describe();
  EXPECT_EQ((*session)->name(), "vm1");
  EXPECT_FALSE((*session)->incoming());
  // The session's ioctls go from here to the kernel, on the received fd.
  UniqueFd memfd(::memfd_create("ram", MFD_CLOEXEC));
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 7));
  {
    std::lock_guard lock(kernel_.mutex);
    ASSERT_EQ(kernel_.sessions.size(), 1u);
    EXPECT_TRUE(kernel_.sessions.begin()->second.tokens.contains(7));
  }
  const json held = list();
  std::optional<json> entry = find_session(held, "vm1");
  ASSERT_TRUE(entry) << held.dump();
  EXPECT_EQ((*entry)["direction"], "outgoing");
  EXPECT_EQ((*entry)["last_client_pid"], ::getpid());
  EXPECT_GT((*entry)["held_since_ns"].get<int64_t>(), 0);
  auto listed = luo->list_sessions();
  ASSERT_TRUE(listed) << listed.error().describe();
  EXPECT_EQ(*listed, held);
}

TEST_F(LuoAgentTest, KeepsAnOutgoingSessionAfterTheClientClosesItsDescriptor) {
  {
    auto connection = AgentConnection::connect(path_);
    ASSERT_TRUE(connection) << connection.error().describe();
    std::vector<UniqueFd> fds;
    auto reply = (*connection)->call("create-session", json{{"name", "vm1"}}, &fds);
    ASSERT_TRUE(reply) << reply.error().describe();
    ASSERT_EQ(fds.size(), 1u);
    EXPECT_TRUE(kernel_.alive("vm1"));
    // Closed without release-session: as if the vmm crashed.
  }
  EXPECT_TRUE(kernel_.alive("vm1")) << "the agent's own reference must keep the session";
  EXPECT_TRUE(find_session(list(), "vm1"));
}

TEST_F(LuoAgentTest, KeepsTheSessionOfAClientThatDies) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // System calls only: the parent has threads.
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path, path_.data(), path_.size());
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) ::_exit(2);
    const char requests[] = "{\"execute\":\"qmp_capabilities\"}\n"
                            "{\"execute\":\"create-session\",\"arguments\":{\"name\":\"crashy\"}}\n";
    if (::write(fd, requests, sizeof requests - 1) != static_cast<ssize_t>(sizeof requests - 1)) ::_exit(3);
    // Greeting, negotiation, the session's reply: three lines.
    char buffer[4096];
    int lines = 0;
    while (lines < 3) {
      const ssize_t n = ::read(fd, buffer, sizeof buffer);
      if (n <= 0) ::_exit(4);
      for (ssize_t i = 0; i < n; ++i) lines += buffer[i] == '\n';
    }
    ::_exit(0);  // dies holding its descriptor, never releasing
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0);
  EXPECT_TRUE(kernel_.alive("crashy"));
  const json held = list();
  std::optional<json> entry = find_session(held, "crashy");
  ASSERT_TRUE(entry) << held.dump();
  EXPECT_EQ((*entry)["last_client_pid"], child);
}

TEST_F(LuoAgentTest, DestroyingAnOutgoingSessionCancelsItAtTheAgent) {
  auto luo = backend();
  ASSERT_TRUE(luo);
  auto session = luo->create_session("vm1");
  ASSERT_TRUE(session);
  // The backend may go first (the kexec handover drops it): the session
  // still reaches the agent.
  luo.reset();
  EXPECT_TRUE(kernel_.alive("vm1"));
  session->reset();
  EXPECT_FALSE(kernel_.alive("vm1")) << "a cancelled session must not cross the kexec";
  EXPECT_TRUE(list()["sessions"].empty());
}

TEST_F(LuoAgentTest, RetrievingTwiceGivesTheSameSession) {
  kernel_.incoming_available["vm1"] = {1, 2};
  auto luo = backend();
  ASSERT_TRUE(luo);
  ino_t first_inode = 0;
  {
    auto first = luo->retrieve_session("vm1");
    ASSERT_TRUE(first) << first.error().describe();
    EXPECT_TRUE((*first)->incoming());
    auto* agent_session = dynamic_cast<AgentSession*>(first->get());
    ASSERT_NE(agent_session, nullptr);
    first_inode = inode_of(agent_session->kernel_session().fd().get());
    auto file = (*first)->retrieve(1);
    ASSERT_TRUE(file) << file.error().describe();
    // Dropped unfinished: a failed restore.
  }
  EXPECT_TRUE(kernel_.alive("vm1")) << "an unfinished incoming session stays with the agent";
  auto again = backend();
  ASSERT_TRUE(again);
  auto second = again->retrieve_session("vm1");
  ASSERT_TRUE(second) << second.error().describe();
  auto* agent_session = dynamic_cast<AgentSession*>(second->get());
  ASSERT_NE(agent_session, nullptr);
  EXPECT_EQ(inode_of(agent_session->kernel_session().fd().get()), first_inode);
  EXPECT_EQ(kernel_.retrieve_session_calls, 1) << "the kernel allows one retrieve: the agent keeps the session";
  std::optional<json> entry = find_session(list(), "vm1");
  ASSERT_TRUE(entry);
  EXPECT_EQ((*entry)["direction"], "incoming");
  EXPECT_EQ((*entry)["handed_out"], 2);

  // Finishing releases it: once this vmm closes its descriptor, it is gone.
  ASSERT_TRUE((*second)->finish());
  EXPECT_TRUE(list()["sessions"].empty());
  second->reset();
  EXPECT_FALSE(kernel_.alive("vm1"));
}

TEST_F(LuoAgentTest, ReleaseDropsTheAgentsReference) {
  auto luo = backend();
  ASSERT_TRUE(luo);
  auto connection = AgentConnection::connect(path_);
  ASSERT_TRUE(connection);
  std::vector<UniqueFd> fds;
  ASSERT_TRUE((*connection)->call("create-session", json{{"name", "vm1"}}, &fds));
  ASSERT_TRUE(luo->release_session("vm1"));
  EXPECT_TRUE(kernel_.alive("vm1")) << "the client's descriptor still holds it";
  fds.clear();
  EXPECT_FALSE(kernel_.alive("vm1"));
  auto twice = luo->release_session("vm1");
  ASSERT_FALSE(twice);
  EXPECT_NE(twice.error().message.find("holds no session 'vm1'"), std::string::npos) << twice.error().message;
}

TEST_F(LuoAgentTest, ConflictsAreClearErrors) {
  auto luo = backend();
  ASSERT_TRUE(luo);
  auto session = luo->create_session("vm1");
  ASSERT_TRUE(session);
  auto again = luo->create_session("vm1");
  ASSERT_FALSE(again);
  EXPECT_NE(again.error().message.find("release-session it first"), std::string::npos) << again.error().message;
  auto outgoing = luo->retrieve_session("vm1");
  ASSERT_FALSE(outgoing);
  EXPECT_NE(outgoing.error().message.find("only after the kexec"), std::string::npos) << outgoing.error().message;
  auto unknown = luo->retrieve_session("never-preserved");
  ASSERT_FALSE(unknown);
  EXPECT_NE(unknown.error().message.find("no LUO session 'never-preserved'"), std::string::npos)
      << unknown.error().message;
  EXPECT_FALSE(find_session(list(), "never-preserved"));
}

TEST_F(LuoAgentTest, BadRequestsGetErrorsAndTheAgentKeepsServing) {
  auto client = raw_client();
  const std::string long_name(64, 'x');
  for (const char* line : {
           "{not json",
           "[1,2]",
           "{\"execute\":\"create-session\"}",
           "{\"execute\":\"create-session\",\"arguments\":{\"name\":7}}",
           "{\"execute\":\"create-session\",\"arguments\":{\"name\":\"\"}}",
           "{\"execute\":\"create-session\",\"arguments\":{\"name\":\"a\\u0000b\"}}",
           "{\"execute\":\"create-session\",\"arguments\":{\"name\":\"vm\",\"extra\":1}}",
           "{\"execute\":\"retrieve-session\",\"arguments\":{\"nam\":\"vm\"}}",
           "{\"execute\":\"list-sessions\",\"arguments\":{\"all\":true}}",
           "{\"execute\":\"destroy-everything\"}",
       }) {
    auto reply = client.request_line(line);
    ASSERT_TRUE(reply) << line << ": " << reply.error().describe();
    EXPECT_TRUE(reply->contains("error")) << line << " -> " << reply->dump();
    EXPECT_FALSE((*reply)["error"]["desc"].get<std::string>().empty()) << line;
  }
  auto too_long_name = client.execute("create-session", json{{"name", long_name}});
  ASSERT_TRUE(too_long_name);
  EXPECT_FALSE(*too_long_name);
  EXPECT_TRUE(client.take_received_fds().empty()) << "no error reply carries a descriptor";
  EXPECT_TRUE(list()["sessions"].empty());

  auto unknown = client.execute("destroy-everything");
  ASSERT_TRUE(unknown);
  ASSERT_FALSE(*unknown);
  EXPECT_EQ(unknown->error().error_class, control::kCommandNotFound);

  // A line over the limit: an error reply, then the connection closes.
  auto oversized = client.request_line(std::string(kMaxLuoAgentRequestBytes + 10, ' '));
  ASSERT_TRUE(oversized) << oversized.error().describe();
  EXPECT_TRUE(oversized->contains("error")) << oversized->dump();
  EXPECT_FALSE(client.execute("list-sessions")) << "the connection is closed after an oversized line";

  // The agent still serves everyone else.
  auto luo = backend();
  ASSERT_TRUE(luo);
  EXPECT_TRUE(luo->create_session("vm-after"));
}

TEST_F(LuoAgentTest, ARefusedDeviceIsAClearError) {
  FakeLuoKernel other;
  other.device_missing = true;
  FakeLuoKernel::current() = &other;
  auto agent = LuoAgent::open("/dev/liveupdate", FakeLuoKernel::syscalls());
  FakeLuoKernel::current() = &kernel_;
  ASSERT_FALSE(agent);
  EXPECT_NE(agent.error().message.find("the LUO agent cannot start"), std::string::npos);
  EXPECT_NE(agent.error().message.find("CONFIG_LIVEUPDATE"), std::string::npos) << agent.error().message;
}

// A server that is not an agent, or an agent of another protocol: refused
// before anything is asked.
class NotAnAgent final : public control::CommandHandler {
 public:
  control::CommandResult execute(const std::string&, const json&) override { return json::object(); }
};

TEST(LuoAgentClient, RefusesASocketThatIsNotAnAgentOrSpeaksAnotherProtocol) {
  char pattern[] = "/tmp/vmm-luo-agent-client-XXXXXX";
  ASSERT_NE(::mkdtemp(pattern), nullptr);
  const std::string dir = pattern;
  NotAnAgent handler;
  {
    auto server = control::Server::listen(dir + "/control.sock", handler);
    ASSERT_TRUE(server);
    auto connected = AgentBackend::connect(dir + "/control.sock");
    ASSERT_FALSE(connected);
    EXPECT_EQ(connected.error().code, EPROTO);
    EXPECT_NE(connected.error().message.find("not a LUO agent's socket"), std::string::npos);
  }
  {
    control::ServerOptions options;
    options.version = luo_agent_version();
    options.version["luo-agent"]["protocol"] = kLuoAgentProtocol + 1;
    auto server = control::Server::listen(dir + "/future.sock", handler, options);
    ASSERT_TRUE(server);
    auto connected = AgentBackend::connect(dir + "/future.sock");
    ASSERT_FALSE(connected);
    EXPECT_EQ(connected.error().code, EPROTO);
    EXPECT_NE(connected.error().message.find("speaks protocol 2"), std::string::npos) << connected.error().message;
  }
  auto nobody = AgentBackend::connect(dir + "/nobody.sock");
  ASSERT_FALSE(nobody);
  EXPECT_NE(nobody.error().message.find("start `vmm agent"), std::string::npos) << nobody.error().message;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace vmm

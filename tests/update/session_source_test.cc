// Which session source a vmm picks (update/session_source.h): the agent when
// one answers, the device otherwise, an error when an agent named explicitly
// is not there; and what the kexec probe reports through each.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "tests/update/fake_luo_kernel.h"
#include "update/kexec_support.h"
#include "update/luo_agent.h"
#include "update/session_source.h"
#include "vmm/control/server.h"

namespace vmm {
namespace {

using testing::FakeLuoKernel;

class SessionSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    FakeLuoKernel::current() = &kernel_;
    char pattern[] = "/tmp/vmm-session-source-test-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
    // Stands in for /dev/liveupdate: the probe checks that the device exists.
    device_ = dir_ + "/liveupdate";
    std::ofstream(device_).put('\n');
  }
  void TearDown() override {
    if (server_) server_->stop();
    server_.reset();
    agent_.reset();
    FakeLuoKernel::current() = nullptr;
    std::filesystem::remove_all(dir_);
  }

  std::string start_agent() {
    auto agent = LuoAgent::open(device_, FakeLuoKernel::syscalls());
    EXPECT_TRUE(agent) << agent.error().describe();
    agent_ = std::move(*agent);
    const std::string path = dir_ + "/agent.sock";
    auto server = listen_luo_agent(path, *agent_);
    EXPECT_TRUE(server) << server.error().describe();
    server_ = std::move(*server);
    return path;
  }

  SessionSourceOptions options(std::string agent_socket, bool required = false) {
    SessionSourceOptions out;
    out.agent_socket = std::move(agent_socket);
    out.agent_required = required;
    out.device = device_;
    out.syscalls = FakeLuoKernel::syscalls();
    return out;
  }

  FakeLuoKernel kernel_;
  std::string dir_, device_;
  std::unique_ptr<LuoAgent> agent_;
  std::unique_ptr<control::Server> server_;
};

TEST_F(SessionSourceTest, TheDeviceWhenThereIsNoAgent) {
  auto source = open_session_source(options(""));
  ASSERT_TRUE(source) << source.error().describe();
  EXPECT_EQ(source->kind, "device");
  EXPECT_EQ(source->backend->kind(), "kernel");
  EXPECT_EQ(kernel_.device_opens, 1);
  EXPECT_EQ(probe_session_source_kind(options("")), "device");
}

TEST_F(SessionSourceTest, TheAgentWhenOneAnswers) {
  const std::string path = start_agent();
  ASSERT_EQ(kernel_.device_opens, 1);
  auto source = open_session_source(options(path));
  ASSERT_TRUE(source) << source.error().describe();
  EXPECT_EQ(source->kind, "agent");
  EXPECT_EQ(source->where, path);
  EXPECT_EQ(source->backend->kind(), "agent");
  EXPECT_EQ(kernel_.device_opens, 1) << "with an agent, the vmm must not open the device itself";
  EXPECT_EQ(probe_session_source_kind(options(path)), "agent");
}

TEST_F(SessionSourceTest, AnAgentNamedExplicitlyMustAnswer) {
  auto source = open_session_source(options(dir_ + "/nobody.sock", true));
  ASSERT_FALSE(source);
  EXPECT_NE(source.error().message.find(kLuoAgentEnvironment), std::string::npos) << source.error().message;
  EXPECT_EQ(kernel_.device_opens, 0) << "no silent fall back to the device";
}

TEST_F(SessionSourceTest, AStaleDefaultSocketFallsBackToTheDevice) {
  // A socket file nobody listens on: what a dead agent leaves.
  const std::string stale = dir_ + "/stale.sock";
  {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path, stale.data(), stale.size());
    ASSERT_EQ(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address), 0);
  }
  auto source = open_session_source(options(stale, false));
  ASSERT_TRUE(source) << source.error().describe();
  EXPECT_EQ(source->kind, "device");
}

TEST_F(SessionSourceTest, OptionsComeFromTheEnvironmentOrTheDefaultSocket) {
  ::setenv(kLuoAgentEnvironment, "/run/somewhere/agent.sock", 1);
  auto named = session_source_options(dir_ + "/default.sock");
  ::unsetenv(kLuoAgentEnvironment);
  EXPECT_EQ(named.agent_socket, "/run/somewhere/agent.sock");
  EXPECT_TRUE(named.agent_required);

  auto absent = session_source_options(dir_ + "/default.sock");
  EXPECT_TRUE(absent.agent_socket.empty()) << "no default socket: the device, as before the agent";

  std::ofstream(dir_ + "/default.sock").put('\n');
  auto present = session_source_options(dir_ + "/default.sock");
  EXPECT_EQ(present.agent_socket, dir_ + "/default.sock");
  EXPECT_FALSE(present.agent_required);
}

bool have_kvm() { return ::access("/dev/kvm", R_OK | W_OK) == 0; }

TEST_F(SessionSourceTest, TheKexecProbeGoesThroughTheAgentAndSaysSo) {
  if (!have_kvm()) GTEST_SKIP() << "needs /dev/kvm (the probe makes a throwaway VM)";
  const std::string path = start_agent();
  auto support = probe_kexec_support(options(path), "/dev/kvm", std::chrono::seconds(1));
  ASSERT_TRUE(support) << support.error().describe();
  EXPECT_TRUE(support->liveupdate);
  EXPECT_EQ(support->session_source, "agent");
  EXPECT_TRUE(support->memfd.preservable) << support->memfd.refusal;
  EXPECT_FALSE(support->vm_fd.preservable) << "the fake kernel is mainline: memfds only";
  EXPECT_EQ(support->to_json()["session_source"], "agent");
  EXPECT_EQ(kernel_.device_opens, 1);
  EXPECT_TRUE(agent_->list()["sessions"].empty()) << "the probe's throwaway session must be released";
  EXPECT_FALSE(kernel_.alive(fmt::format("vmm-probe-{}", ::getpid())));
}

TEST_F(SessionSourceTest, TheKexecProbeWithoutAnAgentUsesTheDevice) {
  if (!have_kvm()) GTEST_SKIP() << "needs /dev/kvm (the probe makes a throwaway VM)";
  auto support = probe_kexec_support(options(""), "/dev/kvm", std::chrono::seconds(1));
  ASSERT_TRUE(support) << support.error().describe();
  EXPECT_TRUE(support->liveupdate);
  EXPECT_EQ(support->session_source, "device");
  EXPECT_EQ(support->to_json()["session_source"], "device");
}

TEST_F(SessionSourceTest, NoDeviceAndNoAgentIsAnAnswerNotAnError) {
  auto none = options("");
  none.device = dir_ + "/no-such-device";
  auto support = probe_kexec_support(none, "/dev/kvm", std::chrono::seconds(1));
  ASSERT_TRUE(support) << support.error().describe();
  EXPECT_FALSE(support->liveupdate);
  EXPECT_NE(support->unavailable.find("not found"), std::string::npos) << support->unavailable;
}

}  // namespace
}  // namespace vmm

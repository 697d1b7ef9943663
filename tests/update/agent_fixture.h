// The fixture the agent's tests share: a LuoAgent on a fake kernel
// (fake_luo_kernel.h), serving a socket in a folder of its own, and the two
// kinds of client a test talks to it with.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>

#include "tests/update/fake_luo_kernel.h"
#include "update/agent_backend.h"
#include "update/luo_agent.h"
#include "vmm/control/client.h"
#include "vmm/control/server.h"

namespace vmm::testing {

class FakeKernelAgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    FakeLuoKernel::current() = &kernel_;
    char pattern[] = "/tmp/vmm-luo-agent-test-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
    path_ = dir_ + "/agent.sock";
    auto agent = LuoAgent::open("/dev/liveupdate", FakeLuoKernel::syscalls());
    ASSERT_TRUE(agent) << agent.error().describe();
    agent_ = std::move(*agent);
    auto server = listen_luo_agent(path_, *agent_);
    ASSERT_TRUE(server) << server.error().describe();
    server_ = std::move(*server);
  }
  void TearDown() override {
    if (server_) server_->stop();
    server_.reset();
    agent_.reset();
    FakeLuoKernel::current() = nullptr;
    std::filesystem::remove_all(dir_);
  }

  std::unique_ptr<AgentBackend> backend() {
    auto connected = AgentBackend::connect(path_, FakeLuoKernel::syscalls());
    EXPECT_TRUE(connected) << connected.error().describe();
    return connected ? std::move(*connected) : nullptr;
  }
  control::Client raw_client() {
    auto client = control::Client::connect(path_);
    EXPECT_TRUE(client) << client.error().describe();
    EXPECT_TRUE(client->negotiate());
    return std::move(*client);
  }

  FakeLuoKernel kernel_;
  std::string dir_, path_;
  std::unique_ptr<LuoAgent> agent_;
  std::unique_ptr<control::Server> server_;
};

}  // namespace vmm::testing

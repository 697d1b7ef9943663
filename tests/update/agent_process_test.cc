// `vmm agent` as a process: it serves its socket, replaces a stale one, and
// exits cleanly on SIGTERM, removing the socket. Its "device" here is a
// plain file, so it starts and answers, and every session ioctl fails (with
// the kernel's ENOTTY): the error must come back as a reply, never as a
// dead agent.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "update/agent_backend.h"

namespace vmm {
namespace {

class AgentProcess {
 public:
  AgentProcess(const std::string& socket, const std::string& device) {
    pid_ = ::fork();
    if (pid_ == 0) {
      ::execl(VMM_BINARY_PATH, VMM_BINARY_PATH, "agent", "--socket", socket.c_str(), "--device", device.c_str(),
              "--log-level", "warn", static_cast<char*>(nullptr));
      ::_exit(127);
    }
  }
  ~AgentProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  // The exit status after SIGTERM (-1: did not exit in 5 s).
  int terminate() {
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

Result<std::unique_ptr<AgentBackend>> connect_when_up(const std::string& socket) {
  Result<std::unique_ptr<AgentBackend>> connected = fail("never tried");
  for (int i = 0; i < 100; ++i) {
    connected = AgentBackend::connect(socket);
    if (connected) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return connected;
}

TEST(AgentProcess, ServesReplacesAStaleSocketAndExitsOnSigterm) {
  char pattern[] = "/tmp/vmm-agent-process-XXXXXX";
  ASSERT_NE(::mkdtemp(pattern), nullptr);
  const std::string dir = pattern;
  const std::string socket = dir + "/run/agent.sock";  // the agent makes run/
  const std::string device = dir + "/not-a-liveupdate-device";
  std::ofstream(device).put('\n');
  for (int round = 0; round < 2; ++round) {
    if (round == 1) {
      // What an agent killed with SIGKILL leaves: a socket file nobody serves.
      UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      sockaddr_un address{};
      address.sun_family = AF_UNIX;
      std::memcpy(address.sun_path, socket.data(), socket.size());
      ASSERT_EQ(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address), 0);
    }
    AgentProcess agent(socket, device);
    ASSERT_GT(agent.pid(), 0);
    auto luo = connect_when_up(socket);
    ASSERT_TRUE(luo) << "round " << round << ": " << luo.error().describe();
    EXPECT_EQ((*luo)->connection().agent_pid(), agent.pid());
    auto listed = (*luo)->list_sessions();
    ASSERT_TRUE(listed) << listed.error().describe();
    EXPECT_TRUE((*listed)["sessions"].empty());
    auto refused = (*luo)->create_session("vm1");
    ASSERT_FALSE(refused);
    EXPECT_NE(refused.error().message.find("LIVEUPDATE_IOCTL_CREATE_SESSION"), std::string::npos)
        << refused.error().message;
    EXPECT_TRUE((*luo)->list_sessions()) << "the agent survives a refused ioctl";
    luo->reset();
    EXPECT_EQ(agent.terminate(), 0);
    struct stat st {};
    EXPECT_NE(::lstat(socket.c_str(), &st), 0) << "the agent removes its socket when it stops";
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace vmm

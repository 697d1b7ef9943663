// What a Type=notify systemd service hears from the vmm (vmm/service_notify.h):
// a datagram socket stands in for systemd's $NOTIFY_SOCKET.
#include <gtest/gtest.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using namespace std::chrono_literals;

class FakeNotifySocket {
 public:
  FakeNotifySocket() {
    char pattern[] = "/tmp/notify-test-XXXXXX";
    if (::mkdtemp(pattern) == nullptr) return;
    dir_ = pattern;
    path_ = dir_ + "/notify";
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::snprintf(address.sun_path, sizeof address.sun_path, "%s", path_.c_str());
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~FakeNotifySocket() {
    if (fd_ >= 0) ::close(fd_);
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }
  [[nodiscard]] bool ok() const { return fd_ >= 0; }
  [[nodiscard]] const std::string& path() const { return path_; }

  // The next message containing `needle`, or "" after `timeout`.
  std::string wait_for(const std::string& needle, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd readable{fd_, POLLIN, 0};
      if (::poll(&readable, 1, 100) <= 0) continue;
      char buffer[4096];
      const ssize_t n = ::recv(fd_, buffer, sizeof buffer, 0);
      if (n <= 0) continue;
      std::string message(buffer, static_cast<size_t>(n));
      received_.push_back(message);
      if (message.find(needle) != std::string::npos) return message;
    }
    return "";
  }
  // Whether a message received so far contains every one of `needles`.
  [[nodiscard]] bool received_containing(const std::vector<std::string>& needles) const {
    for (const auto& message : received_) {
      bool all_in = true;
      for (const auto& needle : needles) all_in = all_in && message.find(needle) != std::string::npos;
      if (all_in) return true;
    }
    return false;
  }
  [[nodiscard]] std::string all() const {
    std::string out;
    for (const auto& m : received_) out += "[" + m + "] ";
    return out;
  }

 private:
  std::string dir_, path_;
  int fd_ = -1;
  std::vector<std::string> received_;
};

// NOTIFY_SOCKET for the vmms this test starts (they inherit the environment).
struct NotifyEnvironment {
  explicit NotifyEnvironment(const std::string& path) { ::setenv("NOTIFY_SOCKET", path.c_str(), 1); }
  ~NotifyEnvironment() { ::unsetenv("NOTIFY_SOCKET"); }
};

TEST(ServiceNotify, ReadyWhenTheVmRunsAndTheNewMainPidAfterATransfer) {
  REQUIRE_KVM();
  FakeNotifySocket notify;
  ASSERT_TRUE(notify.ok());
  NotifyEnvironment environment(notify.path());
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "64M", "--vcpus", "1"}));
  const std::string ready = notify.wait_for("READY=1", 10s);
  ASSERT_NE(ready, "") << "no READY=1: " << notify.all();
  EXPECT_NE(ready.find("MAINPID=" + std::to_string(vm.pid())), std::string::npos) << ready;

  const pid_t old_pid = vm.pid();
  auto record = ASSERT_OK(vm.command("live-update", {{"mode", "transfer"}}));
  const pid_t successor = record["pid"].get<pid_t>();
  ASSERT_NE(successor, old_pid);
  // The old process, still the service's main pid, names the new one, and
  // the new one says it is ready (in either order: two processes).
  const std::string successor_pid = "MAINPID=" + std::to_string(successor);
  EXPECT_NE(notify.wait_for("STATUS=the VM moved to pid " + std::to_string(successor), 10s), "") << notify.all();
  EXPECT_TRUE(notify.received_containing({"READY=1", successor_pid}) || notify.wait_for("READY=1\n" + successor_pid, 10s) != "")
      << notify.all();
  ASSERT_TRUE(vm.follow(successor));

  ASSERT_OK(vm.command("quit"));
  EXPECT_NE(notify.wait_for("STOPPING=1", 10s), "") << notify.all();
}

}  // namespace
}  // namespace vmm::testing

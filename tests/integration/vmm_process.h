// Runs the real `vmm` binary as a child process for end-to-end tests, with a
// control socket, console and stderr in a private temporary directory.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "base/result.h"
#include "vmm/control/client.h"

// In a test body: the value of a Result that must hold one.
#define ASSERT_OK(expr)                                              \
  ({                                                                 \
    auto result_ = (expr);                                           \
    ASSERT_TRUE(result_.has_value()) << result_.error().describe();  \
    std::move(*result_);                                             \
  })
// In a test body: a Result<void> that must succeed.
#define ASSERT_SUCCESS(expr)                                         \
  do {                                                               \
    auto result_ = (expr);                                           \
    ASSERT_TRUE(result_.has_value()) << result_.error().describe();  \
  } while (0)
#define REQUIRE_KVM()                                                                       \
  do {                                                                                      \
    std::string why_;                                                                       \
    if (!::vmm::testing::kvm_available(&why_)) GTEST_SKIP() << why_ << ": skipping a test that boots a VM"; \
  } while (0)

namespace vmm::testing {

// The production vmm; the test suite's build with fault injection
// (live-update's "x-inject"); a build that speaks another handover version.
std::string vmm_binary();
std::string vmm_faults_binary();
std::string vmm_skewed_binary();

// Skips the current test unless /dev/kvm can be opened.
bool kvm_available(std::string* why);

// A descriptor passed the way systemd passes its fd store ($LISTEN_FDS).
struct ListenFd {
  std::string name;
  int fd = -1;
};

struct ExitStatus {
  bool exited = false;  // false: killed by a signal
  int code = 0;         // exit code or signal number
};

class VmmProcess {
 public:
  // Starts `vmm run --control-socket DIR/vmm.sock --console DIR/console.log
  // ARGS...` and waits (up to `timeout`) until the socket accepts clients.
  // `binary`: the vmm to run (vmm_faults_binary() for tests that inject faults).
  // `listen_fds`: what systemd would pass the service ($LISTEN_FDS).
  [[nodiscard]] static Result<VmmProcess> launch(std::vector<std::string> args,
                                                 std::chrono::milliseconds timeout = std::chrono::seconds(30),
                                                 const std::string& binary = vmm_binary(),
                                                 const std::vector<ListenFd>& listen_fds = {});
  // Runs `vmm ARGS...` to completion (for bad-input tests).
  [[nodiscard]] static Result<std::pair<ExitStatus, std::string>> run_to_exit(
      std::vector<std::string> args, std::chrono::milliseconds timeout = std::chrono::seconds(30),
      const std::string& binary = vmm_binary());

  VmmProcess(VmmProcess&& other) noexcept;
  VmmProcess& operator=(VmmProcess&&) = delete;
  ~VmmProcess();  // SIGKILL if still running; removes the directory

  // A new negotiated client.
  [[nodiscard]] Result<control::Client> connect() const;
  // A client kept by the process object for convenience.
  [[nodiscard]] control::Client& client() { return *client_; }
  // Runs a command that must succeed; the error describes the reply otherwise.
  [[nodiscard]] Result<nlohmann::json> command(const std::string& name,
                                               const nlohmann::json& arguments = nlohmann::json::object());

  [[nodiscard]] std::optional<ExitStatus> wait_exit(std::chrono::milliseconds timeout);
  // After a transfer live update the VM runs in `successor`, which the old
  // vmm started: waits for the old process to exit (it must exit 0) and
  // tracks the new one from then on (this test process is a child
  // subreaper, so the orphaned successor becomes its child).
  [[nodiscard]] Result<void> follow(pid_t successor, std::chrono::milliseconds timeout = std::chrono::seconds(20));
  void signal(int signo) const;
  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] const std::string& socket_path() const { return socket_; }
  [[nodiscard]] const std::string& directory() const { return dir_; }
  [[nodiscard]] std::string console() const;
  [[nodiscard]] std::string stderr_text() const;
  [[nodiscard]] std::chrono::steady_clock::time_point launched_at() const { return launched_; }

  // Polls query-guest until `predicate(reply)` or the timeout.
  template <class Predicate>
  Result<nlohmann::json> wait_guest(Predicate predicate, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    nlohmann::json last;
    while (std::chrono::steady_clock::now() < deadline) {
      auto reply = command("query-guest");
      if (!reply) return std::unexpected(reply.error());
      last = *reply;
      if (predicate(last)) return last;
      ::usleep(5000);
    }
    return fail("timed out waiting for the guest; last query-guest: " + last.dump());
  }

 private:
  VmmProcess() = default;
  pid_t pid_ = -1;
  std::string dir_;
  std::string socket_;
  std::chrono::steady_clock::time_point launched_;
  std::optional<control::Client> client_;
  bool reaped_ = false;
};

}  // namespace vmm::testing

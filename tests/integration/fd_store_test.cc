// A systemd service's VM across a stop of the service (update/fd_store.h):
// SIGTERM puts the VM into the service's fd store, and the next start,
// handed the store's files as $LISTEN_FDS, restores it. A datagram socket
// plays systemd: it keeps what FDSTORE=1 sends, drops what FDSTOREREMOVE=1
// names and answers BARRIER=1 by closing the descriptor that came with it.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/unique_fd.h"
#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

class FakeFdStore {
 public:
  FakeFdStore() {
    char pattern[] = "/tmp/fdstore-test-XXXXXX";
    if (::mkdtemp(pattern) == nullptr) return;
    dir_ = pattern;
    path_ = dir_ + "/notify";
    socket_ = UniqueFd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::snprintf(address.sun_path, sizeof address.sun_path, "%s", path_.c_str());
    if (::bind(socket_.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) socket_.reset();
    if (socket_) thread_ = std::thread([this] { serve(); });
  }
  ~FakeFdStore() {
    stopping_ = true;
    if (thread_.joinable()) thread_.join();
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }
  [[nodiscard]] bool ok() const { return static_cast<bool>(socket_); }
  [[nodiscard]] const std::string& path() const { return path_; }

  // What the store holds, as systemd would pass it to the next start.
  std::vector<ListenFd> listen_fds() {
    std::lock_guard lock(mutex_);
    std::vector<ListenFd> out;
    for (const auto& [name, fd] : stored_) out.push_back({name, fd.get()});
    return out;
  }
  std::vector<std::string> names() {
    std::lock_guard lock(mutex_);
    std::vector<std::string> out;
    for (const auto& [name, fd] : stored_) out.push_back(name);
    return out;
  }
  bool barrier_seen() const { return barriers_ > 0; }

 private:
  static std::string field(const std::string& message, const std::string& key) {
    const auto at = message.find(key + "=");
    if (at == std::string::npos) return "";
    const auto end = message.find('\n', at);
    return message.substr(at + key.size() + 1, end == std::string::npos ? std::string::npos : end - at - key.size() - 1);
  }

  void serve() {
    while (!stopping_) {
      pollfd readable{socket_.get(), POLLIN, 0};
      if (::poll(&readable, 1, 50) <= 0) continue;
      char buffer[4096];
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 16)];
      iovec io{buffer, sizeof buffer};
      msghdr message{};
      message.msg_iov = &io;
      message.msg_iovlen = 1;
      message.msg_control = control;
      message.msg_controllen = sizeof control;
      const ssize_t n = ::recvmsg(socket_.get(), &message, MSG_CMSG_CLOEXEC);
      if (n <= 0) continue;
      std::vector<UniqueFd> fds;
      for (cmsghdr* c = CMSG_FIRSTHDR(&message); c; c = CMSG_NXTHDR(&message, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          fds.emplace_back(fd);
        }
      }
      const std::string text(buffer, static_cast<size_t>(n));
      std::lock_guard lock(mutex_);
      if (text.find("BARRIER=1") != std::string::npos) {
        ++barriers_;  // the descriptors close here: the barrier is passed
      } else if (text.find("FDSTOREREMOVE=1") != std::string::npos) {
        stored_.erase(field(text, "FDNAME"));
      } else if (text.find("FDSTORE=1") != std::string::npos && fds.size() == 1) {
        stored_[field(text, "FDNAME")] = std::move(fds.front());
      }
    }
  }

  std::string dir_, path_;
  UniqueFd socket_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<int> barriers_{0};
  std::mutex mutex_;
  std::map<std::string, UniqueFd> stored_;
};

// $NOTIFY_SOCKET and $FDSTORE, as systemd gives a unit with
// FileDescriptorStoreMax=8, for the vmms this test starts.
struct ServiceEnvironment {
  explicit ServiceEnvironment(const std::string& path, const char* max = "8") {
    ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
    ::setenv("FDSTORE", max, 1);
  }
  ~ServiceEnvironment() {
    ::unsetenv("NOTIFY_SOCKET");
    ::unsetenv("FDSTORE");
  }
};

const std::vector<std::string> kServiceArgs{"--name", "svc1", "--memory", "64M", "--vcpus", "2",
                                            "--memory-backing", "memfd", "--on-sigterm", "fd-store"};

TEST(FdStore, SigtermKeepsTheVmInTheStoreAndTheNextStartRestoresIt) {
  REQUIRE_KVM();
  FakeFdStore store;
  ASSERT_TRUE(store.ok());
  ServiceEnvironment environment(store.path());

  auto first = ASSERT_OK(VmmProcess::launch(kServiceArgs));
  ASSERT_OK(first.wait_guest([](const json& g) { return g["phase"] == "running"; }, 60s));
  const uint64_t heartbeat = ASSERT_OK(first.command("query-guest"))["heartbeat"].get<uint64_t>();
  first.signal(SIGTERM);
  auto exited = first.wait_exit(30s);
  ASSERT_TRUE(exited) << first.stderr_text();
  EXPECT_TRUE(exited->exited && exited->code == 0) << first.stderr_text();
  EXPECT_TRUE(store.barrier_seen()) << "the vmm exited without waiting for systemd to take the files";
  const auto names = store.names();
  // RAM, the shared region, the state and the record: no VM fd, no guest_memfd.
  EXPECT_EQ(names, (std::vector<std::string>{"vmm.svc1.16", "vmm.svc1.17", "vmm.svc1.2", "vmm.svc1.3"}))
      << first.stderr_text();
  EXPECT_NE(first.stderr_text().find("systemd fd store: stored 4 files"), std::string::npos) << first.stderr_text();

  // The next start of the service: same command line, the store's files.
  auto second = ASSERT_OK(VmmProcess::launch(kServiceArgs, 30s, vmm_binary(), store.listen_fds()));
  EXPECT_NE(second.stderr_text().find("restoring it instead of booting"), std::string::npos) << second.stderr_text();
  auto guest = ASSERT_OK(second.command("query-guest"));
  EXPECT_EQ(guest["phase"], "running") << "restored, not booted: " << guest.dump();
  EXPECT_GE(guest["heartbeat"].get<uint64_t>(), heartbeat) << "the heartbeat continues; it is not reset";
  auto verified = ASSERT_OK(second.command("guest-verify", {{"timeout", 120}}));
  EXPECT_EQ(verified["mismatches"], 0) << verified.dump();
  auto record = ASSERT_OK(second.command("query-live-update"));
  EXPECT_EQ(record["mode"], "fdstore") << record.dump();
  EXPECT_EQ(record["status"], "completed") << record.dump();
  EXPECT_EQ(record["generation"], 1) << record.dump();
  // Restored: the store is emptied, so a crash now cannot bring back a stale state.
  for (int i = 0; i < 100 && !store.names().empty(); ++i) std::this_thread::sleep_for(20ms);
  EXPECT_TRUE(store.names().empty());

  // A quit through the socket is a real stop: nothing goes into the store.
  ASSERT_OK(second.command("quit"));
  ASSERT_TRUE(second.wait_exit(30s));
  EXPECT_TRUE(store.names().empty());
}

// The choice crosses a binary update: the new process stores the VM too.
TEST(FdStore, TheChoiceSurvivesATransferUpdate) {
  REQUIRE_KVM();
  FakeFdStore store;
  ASSERT_TRUE(store.ok());
  ServiceEnvironment environment(store.path());
  auto vm = ASSERT_OK(VmmProcess::launch(kServiceArgs));
  auto reply = ASSERT_OK(vm.command("live-update", {{"mode", "transfer"}}));
  ASSERT_TRUE(vm.follow(reply["pid"].get<pid_t>()));
  vm.signal(SIGTERM);
  auto exited = vm.wait_exit(30s);
  ASSERT_TRUE(exited);
  EXPECT_TRUE(exited->exited && exited->code == 0);
  EXPECT_EQ(store.names().size(), 4u);
}

TEST(FdStore, WithoutAStoreSigtermStopsTheVmAndSaysWhy) {
  REQUIRE_KVM();
  FakeFdStore store;
  ASSERT_TRUE(store.ok());
  ServiceEnvironment environment(store.path(), "0");
  auto vm = ASSERT_OK(VmmProcess::launch(kServiceArgs));
  vm.signal(SIGTERM);
  auto exited = vm.wait_exit(30s);
  ASSERT_TRUE(exited);
  EXPECT_NE(vm.stderr_text().find("FileDescriptorStoreMax="), std::string::npos) << vm.stderr_text();
  EXPECT_NE(vm.stderr_text().find("the VM stops with the vmm"), std::string::npos) << vm.stderr_text();
  EXPECT_TRUE(store.names().empty());
}

TEST(FdStore, TheOptionNeedsANameAndMemfdRam) {
  auto [unnamed, unnamed_err] = ASSERT_OK(VmmProcess::run_to_exit({"run", "--on-sigterm", "fd-store",
                                                                    "--memory-backing", "memfd"}));
  EXPECT_EQ(unnamed.code, 2);
  EXPECT_NE(unnamed_err.find("--on-sigterm fd-store needs --name"), std::string::npos) << unnamed_err;
  auto [gmem, gmem_err] = ASSERT_OK(VmmProcess::run_to_exit({"run", "--on-sigterm", "fd-store", "--name", "x"}));
  EXPECT_EQ(gmem.code, 2);
  EXPECT_NE(gmem_err.find("needs --memory-backing memfd"), std::string::npos) << gmem_err;
}

}  // namespace
}  // namespace vmm::testing

// The holders of a failed restore's LUO session (update/session_holder.h),
// with a memfd standing in for the session fd: what is checked is that the
// descriptor's file outlives one holder's SIGKILL or SIGTERM and goes, the
// same file, to whoever takes it, after which both holders exit.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "update/session_holder.h"

namespace vmm {
namespace {

using namespace std::chrono;

class SessionHolder : public ::testing::Test {
 protected:
  void SetUp() override {
    // The twin is the holder's child: reaped here once its parent is gone.
    ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
    name_ = "holder-test-" + std::to_string(::getpid());
    file_.reset(::memfd_create("stand-in-session", MFD_CLOEXEC));
    ASSERT_TRUE(file_);
    struct stat st{};
    ASSERT_EQ(::fstat(file_.get(), &st), 0);
    inode_ = st.st_ino;
  }
  void TearDown() override {
    for (pid_t pid : {holder_, twin_})
      if (pid > 0) ::kill(pid, SIGKILL);
    while (::waitpid(-1, nullptr, WNOHANG) > 0) {
    }
  }

  // Starts a holder (a child with SIGINT/SIGTERM blocked, as in the vmm) and
  // finds its twin, the holder's own child.
  void start_holder() {
    holder_ = ::fork();
    ASSERT_GE(holder_, 0);
    if (holder_ == 0) {
      sigset_t stop;
      sigemptyset(&stop);
      sigaddset(&stop, SIGINT);
      sigaddset(&stop, SIGTERM);
      ::sigprocmask(SIG_BLOCK, &stop, nullptr);
      ::_exit(hold_session(file_.ref(), name_));
    }
    file_.reset();  // only the holders have it now
    const auto deadline = steady_clock::now() + 10s;
    while (twin_ <= 0 && steady_clock::now() < deadline) {
      twin_ = find_child_of(holder_);
      std::this_thread::sleep_for(10ms);
    }
    ASSERT_GT(twin_, 0) << "the holder forked no twin";
  }
  static pid_t find_child_of(pid_t parent) {
    const std::string path = "/proc/" + std::to_string(parent) + "/task/" + std::to_string(parent) + "/children";
    FILE* f = std::fopen(path.c_str(), "r");
    if (!f) return -1;
    int child = -1;
    if (std::fscanf(f, "%d", &child) != 1) child = -1;
    std::fclose(f);
    return child;
  }
  // Takes the session, retrying while the holder starts listening.
  Result<UniqueFd> take() {
    const auto deadline = steady_clock::now() + 10s;
    while (true) {
      auto taken = take_held_session(name_);
      if (taken || steady_clock::now() > deadline) return taken;
      std::this_thread::sleep_for(20ms);
    }
  }
  static bool exits_within(pid_t pid, milliseconds limit) {
    const auto deadline = steady_clock::now() + limit;
    while (steady_clock::now() < deadline) {
      if (::waitpid(pid, nullptr, WNOHANG) == pid) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  std::string name_;
  UniqueFd file_;
  ino_t inode_ = 0;
  pid_t holder_ = -1, twin_ = -1;
};

TEST_F(SessionHolder, TheSameFileGoesToWhoeverTakesItAndBothHoldersExit) {
  start_holder();
  auto taken = take();
  ASSERT_TRUE(taken.has_value()) << taken.error().describe();
  struct stat st{};
  ASSERT_EQ(::fstat(taken->get(), &st), 0);
  EXPECT_EQ(st.st_ino, inode_);
  EXPECT_TRUE(exits_within(holder_, 5s));
  EXPECT_TRUE(exits_within(twin_, 5s));
  holder_ = twin_ = -1;
  auto again = take_held_session(name_);
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code, ENOENT);
}

TEST_F(SessionHolder, OneHolderKilledLosesNothing) {
  for (int signal : {SIGKILL, SIGTERM}) {
    SCOPED_TRACE(signal);
    if (!file_) {
      file_.reset(::memfd_create("stand-in-session", MFD_CLOEXEC));
      struct stat st{};
      ASSERT_EQ(::fstat(file_.get(), &st), 0);
      inode_ = st.st_ino;
    }
    twin_ = -1;
    start_holder();
    ASSERT_EQ(::kill(holder_, signal), 0);
    EXPECT_TRUE(exits_within(holder_, 5s)) << "a blocked SIGTERM must still end a holder";
    holder_ = -1;
    auto taken = take();
    ASSERT_TRUE(taken.has_value()) << taken.error().describe();
    struct stat st{};
    ASSERT_EQ(::fstat(taken->get(), &st), 0);
    EXPECT_EQ(st.st_ino, inode_) << "the twin kept it";
    EXPECT_TRUE(exits_within(twin_, 5s));
    twin_ = -1;
  }
}

TEST_F(SessionHolder, NoHolderIsENOENTAndNamesTheSession) {
  auto taken = take_held_session(name_);
  ASSERT_FALSE(taken.has_value());
  EXPECT_EQ(taken.error().code, ENOENT);
  EXPECT_NE(taken.error().message.find(name_), std::string::npos) << taken.error().message;
}

}  // namespace
}  // namespace vmm

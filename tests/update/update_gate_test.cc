// The coordinated kexec update's gates (update/update_gate.h): what lets an
// update on, and everything that ends it.
#include "update/update_gate.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

namespace vmm {
namespace {

using namespace std::chrono_literals;

// Runs wait_at on another thread; the future holds its result.
std::future<Result<void>> wait_async(UpdateGate& gate, UpdateGate::Stop stop, int fd,
                                     const std::atomic<bool>& cancelled) {
  return std::async(std::launch::async, [&gate, stop, fd, &cancelled] { return gate.wait_at(stop, fd, cancelled); });
}

// Polls until the gate reports `stop` (the waiter has arrived).
bool arrives(const UpdateGate& gate, UpdateGate::Stop stop) {
  for (int i = 0; i < 500; ++i) {
    if (gate.waiting() == stop) return true;
    std::this_thread::sleep_for(2ms);
  }
  return false;
}

TEST(UpdateGate, ContinueLetsTheFreezeGateThroughOnly) {
  UpdateGate gate;
  std::atomic<bool> cancelled{false};
  gate.begin();
  EXPECT_FALSE(gate.proceed()) << "nobody waits yet";
  auto freeze = wait_async(gate, UpdateGate::Stop::freeze, -1, cancelled);
  ASSERT_TRUE(arrives(gate, UpdateGate::Stop::freeze));
  ASSERT_TRUE(gate.proceed());
  auto passed = freeze.get();
  EXPECT_TRUE(passed) << passed.error().describe();
  EXPECT_EQ(gate.waiting(), UpdateGate::Stop::none);

  // Frozen: nothing but a cancel ends the wait for the kexec.
  auto kexec = wait_async(gate, UpdateGate::Stop::kexec, -1, cancelled);
  ASSERT_TRUE(arrives(gate, UpdateGate::Stop::kexec));
  auto refused = gate.proceed();
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("frozen already"), std::string::npos) << refused.error().message;
  EXPECT_EQ(kexec.wait_for(50ms), std::future_status::timeout) << "a refused continue lets nothing through";
  ASSERT_TRUE(gate.cancel("test over"));
  auto ended = kexec.get();
  ASSERT_FALSE(ended);
  EXPECT_EQ(ended.error().code, ECANCELED);
  EXPECT_NE(ended.error().message.find("test over"), std::string::npos) << ended.error().message;
  gate.end();
}

TEST(UpdateGate, ACancelBetweenTheGatesStopsTheUpdateAtTheNextOne) {
  UpdateGate gate;
  std::atomic<bool> cancelled{false};
  gate.begin();
  // Sent while the vCPUs are being paused: no gate is waiting right then.
  ASSERT_TRUE(gate.cancel("another VM failed to freeze"));
  auto result = gate.wait_at(UpdateGate::Stop::kexec, -1, cancelled);
  ASSERT_FALSE(result);
  EXPECT_NE(result.error().message.find("another VM failed to freeze"), std::string::npos);
  gate.end();
  auto after = gate.cancel("late");
  ASSERT_FALSE(after) << "no coordinated update runs after end()";
  EXPECT_NE(after.error().message.find("no coordinated live update"), std::string::npos);
}

TEST(UpdateGate, TheCoordinatorsHangupEndsTheWait) {
  UpdateGate gate;
  std::atomic<bool> cancelled{false};
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, pair), 0);
  gate.begin();
  auto waiting = wait_async(gate, UpdateGate::Stop::freeze, pair[0], cancelled);
  ASSERT_TRUE(arrives(gate, UpdateGate::Stop::freeze));
  // A pipelined request is data, not a hangup.
  ASSERT_EQ(::write(pair[1], "{}\n", 3), 3);
  EXPECT_EQ(waiting.wait_for(100ms), std::future_status::timeout);
  ::close(pair[1]);
  ASSERT_EQ(waiting.wait_for(2s), std::future_status::ready);
  auto result = waiting.get();
  ASSERT_FALSE(result);
  EXPECT_NE(result.error().message.find("connection closed"), std::string::npos) << result.error().message;
  ::close(pair[0]);
  gate.end();
}

TEST(UpdateGate, ShuttingDownEndsTheWait) {
  UpdateGate gate;
  std::atomic<bool> cancelled{false};
  gate.begin();
  auto waiting = wait_async(gate, UpdateGate::Stop::freeze, -1, cancelled);
  ASSERT_TRUE(arrives(gate, UpdateGate::Stop::freeze));
  cancelled = true;
  ASSERT_EQ(waiting.wait_for(2s), std::future_status::ready);
  auto result = waiting.get();
  ASSERT_FALSE(result);
  EXPECT_NE(result.error().message.find("shutting down"), std::string::npos) << result.error().message;
  gate.end();
}

}  // namespace
}  // namespace vmm

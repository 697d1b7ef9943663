// A command that waits (guest-verify, up to its timeout of at most an hour)
// must not hold the vmm when it shuts down: quit, SIGTERM and the old process
// of a transfer live update stop the control server, which requests every
// running command's stop token, and the command replies at once.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>

#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

// A guest that works at 1% of each 100 ms tick takes many seconds to stamp
// its RAM, and guest-verify waits for stamping to finish: the verify below
// stays pending far longer than any of these tests runs.
Result<VmmProcess> launch_slow_guest() {
  return VmmProcess::launch({"--memory", "512M", "--cmdline", "budget-percent=1 tick-us=100000"});
}

// Sends a guest-verify that may wait an hour, on its own connection.
Result<control::Client> start_long_verify(const VmmProcess& vm) {
  VMM_TRY_ASSIGN(client, vm.connect());
  VMM_TRY(client.send_raw(R"({"execute": "guest-verify", "arguments": {"timeout": 3600}, "id": "v"})" "\n"));
  // Let it reach the wait (nothing reports that it has).
  std::this_thread::sleep_for(300ms);
  return client;
}

// The pending client gets the error reply, or at least EOF; never a hang.
void expect_verify_ended(control::Client& verifier) {
  verifier.set_timeout(5s);
  auto reply = verifier.read_reply();
  if (!reply) {
    EXPECT_NE(reply.error().message.find("closed the connection"), std::string::npos) << reply.error().describe();
    return;
  }
  ASSERT_TRUE(reply->contains("error")) << "the verify cannot have finished: " << reply->dump();
  EXPECT_EQ((*reply)["id"], "v");
  EXPECT_EQ((*reply)["error"]["class"], "GenericError");
  const std::string desc = (*reply)["error"]["desc"];
  // Whichever ends the wait first: the vmm's shutdown, or (in a transfer's
  // old process) the update that began, which refuses a verify in flight.
  const bool shutting_down = desc.starts_with("the vmm is shutting down: guest-verify gave up after");
  const bool updating = desc.starts_with("guest-verify (guest-verify gave up after") &&
                        desc.find("a live update is in progress") != std::string::npos;
  EXPECT_TRUE(shutting_down || updating) << desc;
}

TEST(StopToken, QuitDoesNotWaitForAPendingGuestVerify) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(launch_slow_guest());
  auto verifier = ASSERT_OK(start_long_verify(vm));
  const auto before = std::chrono::steady_clock::now();
  auto quit = vm.client().execute("quit");
  ASSERT_TRUE(quit) << quit.error().describe();
  auto exit = vm.wait_exit(10s);
  ASSERT_TRUE(exit) << "the vmm is still running " << std::chrono::duration_cast<std::chrono::seconds>(
                           std::chrono::steady_clock::now() - before).count()
                    << " s after quit";
  EXPECT_LT(std::chrono::steady_clock::now() - before, 5s);
  EXPECT_TRUE(exit->exited);
  EXPECT_EQ(exit->code, 0);
  expect_verify_ended(verifier);
}

TEST(StopToken, SigtermDoesNotWaitForAPendingGuestVerify) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(launch_slow_guest());
  auto verifier = ASSERT_OK(start_long_verify(vm));
  const auto before = std::chrono::steady_clock::now();
  vm.signal(SIGTERM);
  auto exit = vm.wait_exit(10s);
  ASSERT_TRUE(exit) << "the vmm is still running 10 s after SIGTERM";
  EXPECT_LT(std::chrono::steady_clock::now() - before, 5s);
  EXPECT_TRUE(exit->exited);
  EXPECT_EQ(exit->code, 0);
  expect_verify_ended(verifier);
}

TEST(StopToken, OldProcessOfATransferDoesNotWaitForAPendingGuestVerify) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(launch_slow_guest());
  auto verifier = ASSERT_OK(start_long_verify(vm));
  auto reply = ASSERT_OK(vm.command("live-update", {{"mode", "transfer"}}));
  ASSERT_TRUE(reply.contains("pid") && reply["pid"].is_number_integer()) << reply.dump();
  // The old process must exit (0) while the verify it was serving is pending.
  ASSERT_SUCCESS(vm.follow(static_cast<pid_t>(reply["pid"].get<int64_t>()), 10s));
  expect_verify_ended(verifier);
  // The VM lives on in the new process.
  auto status = ASSERT_OK(vm.command("query-status"));
  EXPECT_EQ(status["status"], "running");
}

}  // namespace
}  // namespace vmm::testing

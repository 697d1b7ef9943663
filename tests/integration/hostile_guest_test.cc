// The guest is hostile input. These tests boot the hostile test guest
// (guest/hostile.c), which keeps writing extreme, changing values into every
// field of the shared region (counters at 2^64-1 and jumping backwards, rings
// full of nonsense, a TSC rate toggling between 0 and 1000 kHz), and check
// that the vmm stays alive and bounded: every command that reads guest data
// answers promptly, live updates in both modes complete, what
// query-live-update reports is either absent/unavailable or sane, and `quit`
// and SIGTERM still end the vmm within a couple of seconds.
#include <gtest/gtest.h>
#include <signal.h>

#include <string>
#include <thread>

#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using std::chrono::steady_clock;

// Longer than any command against a bounded guest link takes, far shorter
// than a vmm spinning on guest data would take to answer (never).
constexpr auto kPromptReply = 5s;
// How long `quit` or SIGTERM may take to end the vmm.
constexpr auto kPromptExit = 3s;

Result<VmmProcess> launch_hostile(std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"--kernel", HOSTILE_GUEST_PATH, "--memory", "64M"};
  args.insert(args.end(), extra.begin(), extra.end());
  VMM_TRY_ASSIGN(vm, VmmProcess::launch(args));
  vm.client().set_timeout(kPromptReply);
  return vm;
}

// A command's reply (success or error), which must come within kPromptReply.
Result<control::CommandResult> ask(VmmProcess& vm, const std::string& name, const json& arguments = json::object()) {
  const auto started = steady_clock::now();
  VMM_TRY_ASSIGN(reply, vm.client().execute(name, arguments));
  if (steady_clock::now() - started > kPromptReply) return fail(name + " answered, but only after " +
                                                               std::to_string(kPromptReply.count()) + " s");
  return reply;
}

// What query-live-update reports about the guest must be absent, marked
// unavailable, or possible: no duration longer than the time since `since`,
// none negative, and a status the protocol knows.
void expect_sane_record(const json& record, steady_clock::time_point since) {
  const int64_t possible_us =
      std::chrono::duration_cast<std::chrono::microseconds>(steady_clock::now() - since).count();
  for (const char* key : {"guest_gap_us", "brownout_us", "blackout_us"}) {
    if (!record.contains(key)) continue;
    ASSERT_TRUE(record[key].is_number_integer()) << key << ": " << record.dump();
    EXPECT_GE(record[key].get<int64_t>(), 0) << key << ": " << record.dump();
    EXPECT_LE(record[key].get<int64_t>(), possible_us) << key << " is longer than the update can have taken: "
                                                       << record.dump();
  }
  if (record.contains("baseline_pass_us")) {
    EXPECT_GE(record["baseline_pass_us"].get<int64_t>(), 0) << record.dump();
    EXPECT_LE(record["baseline_pass_us"].get<int64_t>(), int64_t{3600} * 1'000'000) << record.dump();
  }
  if (record.contains("brownout_status")) {
    const std::string status = record["brownout_status"];
    EXPECT_TRUE(status == "pending" || status == "measured" || status == "unavailable") << record.dump();
    if (status == "measured") {
      EXPECT_TRUE(record.contains("brownout_us")) << record.dump();
    }
    if (status == "unavailable") {
      EXPECT_FALSE(record.contains("brownout_us")) << record.dump();
      EXPECT_TRUE(record.contains("brownout_reason")) << record.dump();
    }
  }
  if (record.contains("guest_gap_reason")) {
    EXPECT_FALSE(record.contains("guest_gap_us")) << record.dump();
  }
}

// One round of every command that reads guest data; each must answer.
void query_everything(VmmProcess& vm) {
  auto guest = ASSERT_OK(ask(vm, "query-guest"));
  ASSERT_TRUE(guest.has_value()) << "query-guest failed: " << guest.error().desc;
  ASSERT_TRUE(guest->contains("vcpus")) << guest->dump();
  EXPECT_LE((*guest)["vcpus"].size(), 1u) << "the VMM's vCPU count, not the guest's: " << guest->dump();
  EXPECT_LE((*guest)["vcpus_online"].get<uint64_t>(), 1u) << guest->dump();
  EXPECT_LE((*guest)["sweep"]["recent_pass_us"].size(), 8u) << guest->dump();
  for (const auto& us : (*guest)["sweep"]["recent_pass_us"])
    EXPECT_LE(us.get<uint64_t>(), uint64_t{3600} * 1'000'000) << guest->dump();

  // A short timeout: the guest may "answer" with nonsense (an error), or not
  // at all (a timeout); a result it gets must at least be consistent.
  auto verified = ASSERT_OK(ask(vm, "guest-verify", {{"timeout", 0.05}}));
  if (verified) {
    EXPECT_LE((*verified)["mismatches"].get<uint64_t>(), (*verified)["pages_checked"].get<uint64_t>())
        << verified->dump();
  }
  auto record = ASSERT_OK(ask(vm, "query-live-update"));
  ASSERT_TRUE(record.has_value()) << record.error().desc;
  auto status = ASSERT_OK(ask(vm, "query-status"));
  ASSERT_TRUE(status.has_value()) << status.error().desc;
}

void expect_prompt_exit(VmmProcess& vm) {
  const auto started = steady_clock::now();
  auto status = vm.wait_exit(20s);
  ASSERT_TRUE(status.has_value()) << "the vmm did not exit: " << vm.stderr_text();
  EXPECT_LE(steady_clock::now() - started, kPromptExit) << "the vmm took too long to exit: " << vm.stderr_text();
  EXPECT_TRUE(status->exited) << "killed by signal " << status->code << ": " << vm.stderr_text();
  EXPECT_EQ(status->code, 0) << vm.stderr_text();
}

TEST(HostileGuest, BootsAndAttacksTheSharedRegion) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(launch_hostile());
  const auto deadline = steady_clock::now() + 10s;
  while (vm.console().find("hostile-guest: attacking the shared region from the VMM") == std::string::npos &&
         steady_clock::now() < deadline)
    std::this_thread::sleep_for(20ms);
  EXPECT_NE(vm.console().find("hostile-guest: attacking the shared region from the VMM"), std::string::npos)
      << vm.console();
}

class HostileShutdown : public ::testing::TestWithParam<const char*> {};
INSTANTIATE_TEST_SUITE_P(Ways, HostileShutdown, ::testing::Values("quit", "SIGTERM"),
                         [](const auto& info) { return std::string(info.param == std::string("quit") ? "Quit" : "Sigterm"); });

// Every command that reads guest data, many times, while the guest keeps
// changing every field under it.
TEST_P(HostileShutdown, EveryGuestQueryAnswersAndTheVmmStillEnds) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(launch_hostile());
  std::this_thread::sleep_for(200ms);  // the guest is attacking by now
  for (int round = 0; round < 60; ++round) {
    ASSERT_NO_FATAL_FAILURE(query_everything(vm)) << "round " << round;
  }
  if (std::string(GetParam()) == "quit") {
    auto quit = ASSERT_OK(ask(vm, "quit"));
    ASSERT_TRUE(quit.has_value()) << quit.error().desc;
  } else {
    vm.signal(SIGTERM);
  }
  expect_prompt_exit(vm);
}

// Live updates against the hostile guest: mode x how the vmm is ended.
class HostileUpdate : public ::testing::TestWithParam<std::tuple<const char*, const char*>> {};
INSTANTIATE_TEST_SUITE_P(ModesAndWays, HostileUpdate,
                         ::testing::Combine(::testing::Values("exec", "transfer"), ::testing::Values("quit", "SIGTERM")),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param)) + "_" +
                                  (std::get<1>(info.param) == std::string("quit") ? "Quit" : "Sigterm");
                         });

TEST_P(HostileUpdate, UpdatesCompleteTheRecordStaysSaneAndTheVmmStillEnds) {
  REQUIRE_KVM();
  const std::string mode = std::get<0>(GetParam());
  const std::string way = std::get<1>(GetParam());
  auto vm = ASSERT_OK(launch_hostile());
  vm.client().set_timeout(60s);  // a live update's reply
  std::this_thread::sleep_for(200ms);
  for (int update = 1; update <= 2; ++update) {
    SCOPED_TRACE("update " + std::to_string(update));
    const auto started = steady_clock::now();
    auto reply = ASSERT_OK(vm.command("live-update", {{"mode", mode}}));
    EXPECT_EQ(reply["status"], "completed") << reply.dump();
    ASSERT_TRUE(reply.contains("pid")) << reply.dump();
    ASSERT_SUCCESS(vm.follow(static_cast<pid_t>(reply["pid"].get<int64_t>())));
    expect_sane_record(reply, started);
    vm.client().set_timeout(kPromptReply);
    // The guest watch runs meanwhile (the gap within 5 s of the resume):
    // keep reading everything, and the record, while it does.
    const auto watch_until = steady_clock::now() + 1500ms;
    while (steady_clock::now() < watch_until) {
      ASSERT_NO_FATAL_FAILURE(query_everything(vm));
      auto record = ASSERT_OK(ask(vm, "query-live-update"));
      ASSERT_TRUE(record.has_value());
      EXPECT_EQ((*record)["status"], "completed") << record->dump();
      EXPECT_EQ((*record)["generation"], update) << record->dump();
      ASSERT_NO_FATAL_FAILURE(expect_sane_record(*record, started));
      std::this_thread::sleep_for(50ms);
    }
    vm.client().set_timeout(60s);
  }
  vm.client().set_timeout(kPromptReply);
  if (way == "quit") {
    auto quit = ASSERT_OK(ask(vm, "quit"));
    ASSERT_TRUE(quit.has_value()) << quit.error().desc;
  } else {
    vm.signal(SIGTERM);
  }
  expect_prompt_exit(vm);
}

}  // namespace
}  // namespace vmm::testing

// Live updates racing the other control commands (issue 10, A and B): an
// update freezes the machine atomically, so stop, cont, guest-verify and quit
// are refused with a clear EBUSY error while it runs, the guest never runs
// after its state was saved, and a guest that shuts down while it is being
// paused neither deadlocks the pause nor makes it time out.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <fstream>
#include <mutex>
#include <thread>

#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

bool contains(const std::string& text, std::string_view part) { return text.find(part) != std::string::npos; }

// The refusal every command gets while a live update holds the machine.
bool is_busy_refusal(const std::string& desc) {
  return contains(desc, "a live update is in progress") && contains(desc, "retry when it ends") &&
         contains(desc, "Device or resource busy");
}
// After a transfer the old vmm only exits, and says so.
bool is_handed_over_refusal(const std::string& desc) { return contains(desc, "handed its VM over"); }

// A "new vmm binary" that takes a second to start: the update's prepare
// phase then lasts that long, a window in which the test knows an update
// is in progress.
std::string slow_vmm(const VmmProcess& vm) {
  const std::string path = vm.directory() + "/slow-vmm.sh";
  std::ofstream(path) << "#!/bin/sh\nsleep 1\nexec '" << vmm_binary() << "' \"$@\"\n";
  ::chmod(path.c_str(), 0755);
  return path;
}

Result<json> wait_stamped(VmmProcess& vm) {
  return vm.wait_guest([](const json& g) { return g["phase"] == "running"; }, 60s);
}

// Until it succeeds: cont (others may have stopped the VM), then guest-verify.
Result<json> verify_running(VmmProcess& vm) {
  std::string last;
  for (int attempt = 0; attempt < 50; ++attempt) {
    VMM_TRY_ASSIGN(reply, vm.client().execute("cont"));
    if (!reply) last = reply.error().desc;
    VMM_TRY_ASSIGN(verified, vm.client().execute("guest-verify", {{"timeout", 30}}));
    if (verified) return *verified;
    last = verified.error().desc;
    std::this_thread::sleep_for(20ms);
  }
  return fail("guest-verify never succeeded; last error: " + last);
}

TEST(UpdateRace, EveryCommandThatMovesTheGuestIsRefusedWhileAnUpdateRuns) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}));
  ASSERT_OK(wait_stamped(vm));
  const std::string binary = slow_vmm(vm);

  std::optional<Result<control::CommandResult>> update_reply;
  // The kept client asks for the update: it is the connection the new vmm
  // inherits. Nothing else uses it until the updater is joined.
  vm.client().set_timeout(60s);
  std::thread updater([&] {
    update_reply = vm.client().execute("live-update", {{"mode", "transfer"}, {"binary", binary}});
  });
  auto observer = ASSERT_OK(vm.connect());
  const auto deadline = Clock::now() + 10s;
  bool in_progress = false;
  while (!in_progress && Clock::now() < deadline) {
    auto record = ASSERT_OK(observer.execute("query-live-update"));
    ASSERT_TRUE(record.has_value());
    in_progress = (*record)["status"] == "in-progress";
    if (!in_progress) std::this_thread::sleep_for(1ms);
  }
  ASSERT_TRUE(in_progress) << "the update never showed as in progress";

  // The new vmm is still starting (a second): every one of these lands
  // inside the update, quit included.
  for (const char* command : {"stop", "cont", "guest-verify", "quit"}) {
    SCOPED_TRACE(command);
    auto reply = ASSERT_OK(observer.execute(command));
    ASSERT_FALSE(reply.has_value()) << command << " was accepted during the update: " << reply->dump();
    EXPECT_TRUE(is_busy_refusal(reply.error().desc)) << reply.error().desc;
  }
  auto second = ASSERT_OK(observer.execute("live-update", {{"mode", "exec"}}));
  ASSERT_FALSE(second.has_value());
  EXPECT_TRUE(contains(second.error().desc, "a live update is already in progress")) << second.error().desc;
  EXPECT_EQ(ASSERT_OK(observer.execute("query-status")).value()["status"], "running")
      << "queries still answer during the update";

  updater.join();
  ASSERT_TRUE(update_reply.has_value());
  auto outcome = ASSERT_OK(std::move(*update_reply));
  ASSERT_TRUE(outcome.has_value()) << outcome.error().desc;
  EXPECT_EQ((*outcome)["status"], "completed");
  ASSERT_SUCCESS(vm.follow(static_cast<pid_t>((*outcome)["pid"].get<int64_t>())));

  // The refused quit did not take effect: the VM runs on in the new vmm.
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
  auto verified = ASSERT_OK(vm.command("guest-verify", {{"timeout", 60}}));
  EXPECT_EQ(verified["mismatches"], 0) << verified.dump();
  EXPECT_FALSE(vm.wait_exit(300ms).has_value()) << "the refused quit shut the VM down";
}

// What the hammering clients saw.
struct Tally {
  std::mutex mutex;
  std::vector<std::string> violations;
  std::atomic<uint64_t> accepted{0}, busy{0}, handed_over{0}, other_errors{0}, dropped{0}, verified{0};
  void violation(std::string what) {
    std::lock_guard lock(mutex);
    if (violations.size() < 20) violations.push_back(std::move(what));
  }
};

// One client: stop, cont, guest-verify, query-status and query-guest in turn,
// reconnecting whenever an update takes its connection away. Checks every
// reply and every event on the way.
void hammer(VmmProcess& vm, std::atomic<bool>& done, Tally& tally, int seed) {
  static constexpr const char* kCommands[] = {"stop", "cont", "guest-verify", "query-status", "query-guest", "cont"};
  std::optional<control::Client> client;
  bool frozen = false;  // this connection saw an update's prepare phase end
  uint64_t heartbeat = 0;
  for (uint64_t i = static_cast<uint64_t>(seed); !done; ++i) {
    if (!client) {
      auto connected = vm.connect();
      if (!connected) {
        std::this_thread::sleep_for(5ms);
        continue;
      }
      client.emplace(std::move(*connected));
      client->set_timeout(40s);
      frozen = false;
    }
    const std::string command = kCommands[i % std::size(kCommands)];
    json arguments = command == "guest-verify" ? json{{"timeout", 20}} : json::object();
    auto sent = client->execute(command, arguments);
    std::this_thread::sleep_for(200us);  // hammer, but leave the host's two cores some air
    for (const auto& event : client->take_events()) {
      const std::string name = event.value("event", "");
      const json data = event.value("data", json::object());
      if (name == "LIVE_UPDATE" && data.value("status", "") == "in-progress" && data.value("phase", "") == "prepare")
        frozen = true;
      if (name == "LIVE_UPDATE" && data.value("status", "") == "failed") {
        frozen = false;
        tally.violation("an update failed: " + data.dump());
      }
      if (name == "RESUME" && frozen)
        tally.violation("the guest was resumed after a live update froze it (its saved state is then stale)");
    }
    if (!sent) {  // the connection went away with an update: reconnect
      ++tally.dropped;
      client.reset();
      continue;
    }
    if (*sent) {
      ++tally.accepted;
      if (command == "guest-verify") {
        ++tally.verified;
        if ((**sent)["mismatches"] != 0) tally.violation("guest-verify found mismatches: " + (*sent)->dump());
      }
      if (command == "query-guest") {
        const uint64_t now = (**sent)["heartbeat"].get<uint64_t>();
        if (now < heartbeat)
          tally.violation("the heartbeat went back from " + std::to_string(heartbeat) + " to " + std::to_string(now));
        heartbeat = std::max(heartbeat, now);
      }
      continue;
    }
    const std::string desc = sent->error().desc;
    if (is_busy_refusal(desc)) {
      ++tally.busy;
    } else if (is_handed_over_refusal(desc)) {
      ++tally.handed_over;
    } else if (command == "guest-verify" &&
               (contains(desc, "can only verify its memory while running") || contains(desc, "timed out"))) {
      ++tally.other_errors;  // another client had stopped the VM
    } else {
      tally.violation(command + " got an unexpected error: " + desc);
    }
  }
}

TEST(UpdateRace, CommandsHammeredDuringUpdatesNeverRunAFrozenGuest) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}));
  ASSERT_OK(wait_stamped(vm));

  std::atomic<bool> done{false};
  Tally tally;
  std::vector<std::thread> hammers;
  for (int seed = 0; seed < 3; ++seed) hammers.emplace_back([&, seed] { hammer(vm, done, tally, seed * 2); });

  uint64_t heartbeat = 0;
  for (int round = 0; round < 6; ++round) {
    const std::string mode = round % 2 == 0 ? "transfer" : "exec";
    SCOPED_TRACE("update " + std::to_string(round + 1) + " (" + mode + ")");
    std::this_thread::sleep_for(150ms);  // let the hammering run a while first
    const uint64_t before = ASSERT_OK(vm.command("query-guest"))["heartbeat"].get<uint64_t>();
    EXPECT_GE(before, heartbeat);
    vm.client().set_timeout(60s);
    auto reply = ASSERT_OK(vm.client().execute("live-update", {{"mode", mode}}));
    ASSERT_TRUE(reply.has_value()) << reply.error().desc;
    ASSERT_EQ((*reply)["status"], "completed");
    ASSERT_EQ((*reply)["generation"], round + 1);
    ASSERT_SUCCESS(vm.follow(static_cast<pid_t>((*reply)["pid"].get<int64_t>())));
    auto after = ASSERT_OK(vm.command("query-guest"));
    heartbeat = after["heartbeat"].get<uint64_t>();
    EXPECT_GE(heartbeat, before) << "the heartbeat never goes back across an update";
    auto verified = ASSERT_OK(verify_running(vm));
    EXPECT_EQ(verified["mismatches"], 0) << verified.dump();
    EXPECT_EQ(verified["pages_checked"], after["pages_total"]);
  }
  done = true;
  for (auto& thread : hammers) thread.join();

  std::lock_guard lock(tally.mutex);
  for (const auto& violation : tally.violations) ADD_FAILURE() << violation;
  EXPECT_GT(tally.busy.load(), 0u) << "no command ever landed inside an update";
  EXPECT_GT(tally.accepted.load(), 0u);
  RecordProperty("accepted", std::to_string(tally.accepted.load()));
  RecordProperty("refused_busy", std::to_string(tally.busy.load()));
  std::printf("hammered: %lu accepted, %lu refused as busy, %lu after a handover, %lu paused-guest verify errors, "
              "%lu connections dropped by updates, %lu verified\n",
              tally.accepted.load(), tally.busy.load(), tally.handed_over.load(), tally.other_errors.load(),
              tally.dropped.load(), tally.verified.load());

  // Once everything settles the guest verifies clean.
  auto verified = ASSERT_OK(verify_running(vm));
  EXPECT_EQ(verified["mismatches"], 0) << verified.dump();
}

// B: the guest writes the exit port (exit-after) while stop/cont (and live
// updates) keep pausing it. A pause that meets the guest's shutdown finishes
// or fails at once; none waits for its 2 s timeout, and the vmm exits 0.
class ShutdownDuringPause : public ::testing::TestWithParam<const char*> {};
INSTANTIATE_TEST_SUITE_P(Updates, ShutdownDuringPause, ::testing::Values("none", "exec", "transfer"));

TEST_P(ShutdownDuringPause, GuestExitWhilePausingNeverDeadlocksOrTimesOut) {
  REQUIRE_KVM();
  const std::string mode = GetParam();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "64M", "--vcpus", "2", "--cmdline", "exit-after=2500"}));
  std::atomic<bool> done{false};
  Tally tally;
  std::atomic<int64_t> slowest_us{0};
  std::thread pauser([&] {
    std::optional<control::Client> client;
    for (int i = 0; !done; ++i) {
      if (!client) {
        auto connected = vm.connect();
        if (!connected) {
          std::this_thread::sleep_for(5ms);
          continue;
        }
        client.emplace(std::move(*connected));
      }
      const char* command = i % 2 == 0 ? "stop" : "cont";
      const auto begin = Clock::now();
      auto sent = client->execute(command);
      const auto took = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - begin).count();
      if (!sent) {
        client.reset();
        continue;
      }
      int64_t seen = slowest_us.load();
      while (took > seen && !slowest_us.compare_exchange_weak(seen, took)) {
      }
      if (!*sent) {
        const std::string desc = sent->error().desc;
        if (contains(desc, "did not pause within")) tally.violation(std::string(command) + ": " + desc);
        else if (contains(desc, "shutting down") || contains(desc, "has shut down") || is_busy_refusal(desc) ||
                 is_handed_over_refusal(desc))
          ++tally.busy;
        else
          tally.violation(std::string(command) + " got an unexpected error: " + desc);
      }
    }
  });
  std::optional<ExitStatus> exit;
  const auto deadline = Clock::now() + 60s;
  while (!exit && Clock::now() < deadline) {
    if (mode != "none") {
      vm.client().set_timeout(60s);
      auto reply = vm.client().execute("live-update", {{"mode", mode}});
      if (reply && *reply) {
        if (auto followed = vm.follow(static_cast<pid_t>((**reply)["pid"].get<int64_t>())); !followed)
          break;  // the successor may already have exited with the guest
      } else if (reply) {
        const std::string desc = reply->error().desc;
        EXPECT_FALSE(contains(desc, "did not pause within")) << desc;
        EXPECT_TRUE(contains(desc, "shutting down") || contains(desc, "has shut down")) << desc;
      }
    }
    exit = vm.wait_exit(mode == "none" ? 200ms : 50ms);
    if (!exit && vm.client().execute("query-status").has_value() == false) exit = vm.wait_exit(5s);
  }
  done = true;
  pauser.join();
  if (!exit) exit = vm.wait_exit(10s);
  ASSERT_TRUE(exit.has_value()) << "the vmm did not exit after the guest's exit-after; stderr:\n" << vm.stderr_text();
  EXPECT_TRUE(exit->exited && exit->code == 0) << "exit status " << exit->code << "; stderr:\n" << vm.stderr_text();
  std::lock_guard lock(tally.mutex);
  for (const auto& violation : tally.violations) ADD_FAILURE() << violation;
  EXPECT_LT(slowest_us.load(), 1'500'000) << "a stop or cont took as long as a pause timeout";
  EXPECT_FALSE(contains(vm.stderr_text(), "did not pause within")) << vm.stderr_text();
}

}  // namespace
}  // namespace vmm::testing

// End-to-end: the real vmm binary boots the embedded test guest on /dev/kvm
// and is driven through its control socket.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <set>
#include <thread>

#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

uint64_t heartbeat(VmmProcess& vm) {
  auto reply = vm.command("query-guest");
  return reply ? (*reply)["heartbeat"].get<uint64_t>() : 0;
}

struct BootCase {
  const char* memory;
  uint32_t vcpus;
  const char* backing;
};

void PrintTo(const BootCase& c, std::ostream* out) { *out << c.memory << "/" << c.vcpus << "/" << c.backing; }

class Boot : public ::testing::TestWithParam<BootCase> {};

// Boots, sees the heartbeat advance on every vCPU, then verifies every page.
TEST_P(Boot, HeartbeatAdvancesAndEveryPageVerifies) {
  REQUIRE_KVM();
  const BootCase& param = GetParam();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", param.memory, "--vcpus", std::to_string(param.vcpus),
                                          "--memory-backing", param.backing}));
  auto first = ASSERT_OK(vm.wait_guest([](const json& g) { return g["heartbeat"].get<uint64_t>() > 0; }, 10s));
  auto later = ASSERT_OK(vm.wait_guest(
      [&](const json& g) { return g["heartbeat"].get<uint64_t>() > first["heartbeat"].get<uint64_t>() + 10; }, 10s));
  EXPECT_EQ(later["vcpus_online"].get<uint32_t>(), param.vcpus);

  auto verified = ASSERT_OK(vm.command("guest-verify", {{"timeout", 120}}));
  auto guest = ASSERT_OK(vm.command("query-guest"));
  EXPECT_EQ(verified["mismatches"].get<uint64_t>(), 0u) << verified.dump();
  EXPECT_EQ(verified["pages_checked"].get<uint64_t>(), guest["pages_total"].get<uint64_t>());
  // Every page of RAM above the guest's image (which sits just above 1 MiB).
  const uint64_t ram_pages = ASSERT_OK(vm.command("query-memory"))[0]["size"].get<uint64_t>() / 4096;
  EXPECT_GT(verified["pages_checked"].get<uint64_t>(), ram_pages * 9 / 10);
  EXPECT_EQ(guest["last_verify"]["mismatches"].get<uint64_t>(), 0u);

  // Every vCPU writes to the console (its first line comes when it comes
  // online; on a loaded host that may take a moment after the heartbeats).
  json vcpus;
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  do {
    vcpus = ASSERT_OK(vm.command("query-vcpus"));
    if (std::ranges::all_of(vcpus, [](const json& v) { return v["exits"]["io"].get<uint64_t>() > 0; })) break;
    std::this_thread::sleep_for(20ms);
  } while (std::chrono::steady_clock::now() < deadline);
  ASSERT_EQ(vcpus.size(), param.vcpus);
  std::set<int64_t> threads;
  for (const auto& vcpu : vcpus) {
    EXPECT_GT(vcpu["thread_id"].get<int64_t>(), 0);
    threads.insert(vcpu["thread_id"].get<int64_t>());
    EXPECT_GT(vcpu["exits"]["io"].get<uint64_t>(), 0u) << "every vCPU talks to the console";
  }
  EXPECT_EQ(threads.size(), param.vcpus);

  ASSERT_OK(vm.command("quit"));
  auto status = vm.wait_exit(20s);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(status->exited);
  EXPECT_EQ(status->code, 0) << vm.stderr_text();
  struct stat st{};
  EXPECT_NE(::stat(vm.socket_path().c_str(), &st), 0) << "the socket is removed on exit";
  EXPECT_NE(vm.console().find("test-guest:"), std::string::npos) << "the guest printed on the console";
}

INSTANTIATE_TEST_SUITE_P(Sizes, Boot,
                         ::testing::Values(BootCase{"256M", 1, "guest_memfd"}, BootCase{"256M", 2, "guest_memfd"},
                                           BootCase{"2G", 1, "guest_memfd"}, BootCase{"2G", 2, "guest_memfd"},
                                           BootCase{"256M", 2, "memfd"}),
                         [](const auto& info) {
                           return std::string(info.param.memory) + "_" + std::to_string(info.param.vcpus) +
                                  "vcpu_" + info.param.backing;
                         });

TEST(BootTiming, FirstHeartbeatWithinOneSecond) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "256M"}));
  auto guest = ASSERT_OK(vm.wait_guest([](const json& g) { return g["heartbeat"].get<uint64_t>() > 0; }, 10s));
  const auto elapsed = std::chrono::steady_clock::now() - vm.launched_at();
  EXPECT_LT(elapsed, 1s) << "first heartbeat after "
                         << std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count() << " ms";
}

TEST(PauseResume, StopFreezesTheGuestAndContResumesIt) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}));
  ASSERT_OK(vm.wait_guest([](const json& g) { return g["heartbeat"].get<uint64_t>() > 5; }, 10s));

  ASSERT_OK(vm.command("stop"));
  {
    const json status = ASSERT_OK(vm.command("query-status"));
    EXPECT_EQ(status["status"], "paused") << status.dump();
    EXPECT_EQ(status["running"], false) << status.dump();
  }
  const uint64_t frozen = heartbeat(vm);
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(heartbeat(vm), frozen) << "no heartbeat while paused";
  for (const auto& vcpu : ASSERT_OK(vm.command("query-vcpus"))) EXPECT_EQ(vcpu["state"], "paused");
  auto refused = ASSERT_OK(vm.client().execute("guest-verify"));
  ASSERT_FALSE(refused.has_value());
  EXPECT_NE(refused.error().desc.find("paused"), std::string::npos);

  ASSERT_OK(vm.command("cont"));
  const json status = ASSERT_OK(vm.command("query-status"));
  EXPECT_EQ(status["status"], "running");
  EXPECT_EQ(status["running"], true);
  EXPECT_TRUE(status["name"].is_string() && !status["name"].get<std::string>().empty()) << status.dump();
  ASSERT_OK(vm.wait_guest([&](const json& g) { return g["heartbeat"].get<uint64_t>() > frozen + 5; }, 10s));
  // Events reached this client: STOP then RESUME.
  auto events = vm.client().take_events();
  std::vector<std::string> names;
  for (const auto& event : events) names.push_back(event["event"]);
  EXPECT_NE(std::ranges::find(names, "STOP"), names.end());
  EXPECT_NE(std::ranges::find(names, "RESUME"), names.end());
}

TEST(Memory, QueryMemoryReportsGuestMemfdRamAndMemfdSharedRegion) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "256M", "--shared-memory", "32M"}));
  auto regions = ASSERT_OK(vm.command("query-memory"));
  ASSERT_EQ(regions.size(), 2u) << regions.dump();
  EXPECT_EQ(regions[0]["name"], "ram0");
  EXPECT_EQ(regions[0]["backing"], "guest_memfd");
  EXPECT_EQ(regions[0]["gpa"], 0);
  EXPECT_EQ(regions[0]["size"], 256ull << 20);
  EXPECT_EQ(regions[1]["name"], "shared");
  EXPECT_EQ(regions[1]["backing"], "memfd");
  EXPECT_EQ(regions[1]["size"], 32ull << 20);
  for (const auto& region : regions) {
    EXPECT_GT(region["inode"].get<uint64_t>(), 0u);
    EXPECT_GT(region["device"].get<uint64_t>(), 0u);
  }
  EXPECT_NE(regions[0]["inode"], regions[1]["inode"]);
}

TEST(Memory, QueryMemorySamplesPhysicalFramesOnRequest) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "64M", "--shared-memory", "16M", "--console", "none"}));
  // Once stamped, RAM has pages; most of the shared region has none.
  ASSERT_OK(vm.wait_guest([](const json& g) { return g["phase"] == "running"; }, 60s));
  auto plain = ASSERT_OK(vm.command("query-memory"));
  EXPECT_FALSE(plain[0].contains("frames")) << "frames only on request";
  auto reply = ASSERT_OK(vm.client().execute("query-memory", {{"sample-frames", 5}}));
  ASSERT_TRUE(reply.has_value()) << reply.error().desc;
  const json& regions = *reply;
  ASSERT_EQ(regions.size(), 2u);
  for (const auto& region : regions) {
    ASSERT_EQ(region["frames"].size(), 5u) << region.dump();
    EXPECT_EQ(region["frames"][0]["offset"], 0);
    EXPECT_EQ(region["frames"][4]["offset"], region["size"].get<uint64_t>() - 4096) << "the last page too";
    std::set<uint64_t> pfns;
    size_t pages = 0;
    for (const auto& frame : region["frames"]) {
      if (frame.value("hole", false)) {
        EXPECT_FALSE(frame.contains("pfn")) << "a hole has no frame: " << region.dump();
        continue;
      }
      ++pages;
      pfns.insert(frame["pfn"].get<uint64_t>());
    }
    if (region["name"] == "ram0") {
      EXPECT_GE(pages, 4u) << "the guest stamped its RAM: " << region.dump();
    }
    // The kernel shows frame numbers to CAP_SYS_ADMIN only.
    EXPECT_EQ(region["frames_visible"].get<bool>(), ::geteuid() == 0 && pages > 0) << region.dump();
    if (::geteuid() == 0) {
      EXPECT_EQ(pfns.size(), pages) << "distinct pages, distinct frames: " << region.dump();
      EXPECT_EQ(pfns.count(0), 0u) << region.dump();
    }
  }
  for (const json& bad : {json(-1), json(65), json("4"), json(1.5)}) {
    auto refused = ASSERT_OK(vm.client().execute("query-memory", {{"sample-frames", bad}}));
    ASSERT_FALSE(refused.has_value()) << bad.dump();
    EXPECT_NE(refused.error().desc.find("sample-frames"), std::string::npos) << refused.error().desc;
  }
}

TEST(Memory, RamAbove3GiBIsSplitAroundTheHole) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "4G", "--console", "none"}));
  auto regions = ASSERT_OK(vm.command("query-memory"));
  ASSERT_EQ(regions.size(), 3u) << regions.dump();
  EXPECT_EQ(regions[0]["size"], 3ull << 30);
  EXPECT_EQ(regions[1]["name"], "ram1");
  EXPECT_EQ(regions[1]["gpa"], 4ull << 30);
  EXPECT_EQ(regions[1]["size"], 1ull << 30);
}

class Shutdown : public ::testing::TestWithParam<int> {};

TEST_P(Shutdown, SignalShutsDownCleanly) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  ASSERT_OK(vm.wait_guest([](const json& g) { return g["heartbeat"].get<uint64_t>() > 0; }, 10s));
  vm.signal(GetParam());
  auto status = vm.wait_exit(20s);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(status->exited);
  EXPECT_EQ(status->code, 0);
  struct stat st{};
  EXPECT_NE(::stat(vm.socket_path().c_str(), &st), 0);
}
INSTANTIATE_TEST_SUITE_P(Signals, Shutdown, ::testing::Values(SIGTERM, SIGINT));

// sweep-ms=N: once stamped, vCPU 0 times a read of all of RAM every N ms;
// query-guest reports the passes. Reads only: every page still verifies.
TEST(Sweep, PassesAreTimedAndLeaveEveryPageIntact) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "256M", "--cmdline", "sweep-ms=20"}));
  // Stamping 256 MiB takes a few seconds here (every first touch faults).
  auto guest = ASSERT_OK(vm.wait_guest([](const json& g) { return g["sweep"]["passes"].get<uint64_t>() >= 3; }, 20s));
  const json& sweep = guest["sweep"];
  EXPECT_EQ(guest["phase"], "running") << "passes start once every page is stamped";
  EXPECT_EQ(sweep["period_ms"].get<uint64_t>(), 20u);
  const uint64_t passes = sweep["passes"].get<uint64_t>();
  const auto& recent = sweep["recent_pass_us"];
  ASSERT_TRUE(recent.is_array());
  EXPECT_EQ(recent.size(), std::min<uint64_t>(passes, 8)) << sweep.dump();
  // 65k page reads at a few hundred ns each, in quanta of a fraction of a
  // 1 ms tick: from a few ms to some tens of ms; never 0, never seconds.
  for (const auto& us : recent) {
    EXPECT_GT(us.get<uint64_t>(), 500u) << sweep.dump();
    EXPECT_LT(us.get<uint64_t>(), 2'000'000u) << sweep.dump();
  }
  EXPECT_EQ(sweep["last_pass_us"], recent.back()) << sweep.dump();

  // The period holds: a pass starts at most every 20 ms.
  const auto window_start = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(500ms);
  auto later = ASSERT_OK(vm.command("query-guest"));
  const auto window = std::chrono::steady_clock::now() - window_start;
  const uint64_t more = later["sweep"]["passes"].get<uint64_t>() - passes;
  EXPECT_GT(more, 0u) << later["sweep"].dump();
  EXPECT_LE(more, static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(window).count() / 20 + 2))
      << later["sweep"].dump();

  auto verified = ASSERT_OK(vm.command("guest-verify", {{"timeout", 30}}));
  EXPECT_EQ(verified["mismatches"].get<uint64_t>(), 0u) << verified.dump();
  EXPECT_EQ(verified["pages_checked"].get<uint64_t>(), later["pages_total"].get<uint64_t>());
  EXPECT_EQ(vm.console().find("wrong stamp"), std::string::npos) << vm.console();
}

TEST(Sweep, OffWithoutTheOption) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "256M"}));
  ASSERT_SUCCESS(vm.wait_guest([](const json& g) { return g["phase"] == "running"; }, 20s));
  // Long enough for several passes, had there been a sweep.
  std::this_thread::sleep_for(200ms);
  auto guest = ASSERT_OK(vm.command("query-guest"));
  EXPECT_EQ(guest["sweep"], (json{{"period_ms", 0}, {"passes", 0}, {"last_pass_us", 0},
                                  {"recent_pass_us", json::array()}}));
}

TEST(GuestShutdown, GuestRequestEndsTheVmm) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--cmdline", "exit-after=20"}));
  auto status = vm.wait_exit(20s);
  ASSERT_TRUE(status.has_value()) << "the guest asks to exit after 20 heartbeats";
  EXPECT_TRUE(status->exited);
  EXPECT_EQ(status->code, 0) << vm.stderr_text();
  EXPECT_NE(vm.stderr_text().find("guest requested shutdown"), std::string::npos) << vm.stderr_text();
}

}  // namespace
}  // namespace vmm::testing

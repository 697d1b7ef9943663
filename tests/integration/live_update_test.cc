// End-to-end live updates of the real vmm binary (transfer and exec modes):
// the guest's memory stays where it is, the guest carries on, and every
// failure before the new vmm runs the guest leaves it running on the old one
// with its memory intact.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <signal.h>
#include <cstring>
#include <optional>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

uint64_t heartbeat_of(const json& guest) { return guest["heartbeat"].get<uint64_t>(); }

// RssAnon of `pid` in KiB: anonymous memory, which guest RAM must never be.
uint64_t rss_anon_kib(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  uint64_t value = 0;
  while (status >> key) {
    if (key == "RssAnon:") {
      status >> value;
      return value;
    }
    status.ignore(1 << 10, '\n');
  }
  return 0;
}

// Waits until the guest has stamped all of RAM (so verification covers it).
Result<json> wait_stamped(VmmProcess& vm) {
  return vm.wait_guest([](const json& g) { return g["phase"] == "running"; }, 60s);
}

// Runs one update that must succeed and returns its reply. After a transfer
// the VM runs in a new process: the old one must exit cleanly.
Result<json> live_update(VmmProcess& vm, const std::string& mode, json extra = json::object()) {
  json arguments = {{"mode", mode}};
  arguments.update(extra);
  VMM_TRY_ASSIGN(reply, vm.command("live-update", arguments));
  const auto pid = reply.find("pid");
  if (pid == reply.end() || !pid->is_number_integer()) return fail("the reply names no pid: " + reply.dump());
  VMM_TRY(vm.follow(static_cast<pid_t>(pid->get<int64_t>())));
  return reply;
}
Result<json> exec_update(VmmProcess& vm, json extra = json::object()) { return live_update(vm, "exec", extra); }

std::vector<std::string> phases_of(const json& reply) {
  std::vector<std::string> phases;
  for (const auto& phase : reply["phases"]) phases.push_back(phase["name"]);
  return phases;
}

// The checks after every successful update: the guest runs on from where it
// stopped, on every vCPU, and every page verifies.
void expect_guest_carries_on(VmmProcess& vm, uint64_t heartbeat_before, uint32_t vcpus) {
  auto guest = ASSERT_OK(vm.command("query-guest"));
  EXPECT_GE(heartbeat_of(guest), heartbeat_before) << "the heartbeat continues; it is not reset";
  std::vector<uint64_t> ticks;
  for (const auto& vcpu : guest["vcpus"]) ticks.push_back(vcpu["ticks"].get<uint64_t>());
  ASSERT_EQ(ticks.size(), vcpus);
  auto later = ASSERT_OK(vm.wait_guest(
      [&](const json& g) {
        for (size_t i = 0; i < ticks.size(); ++i)
          if (g["vcpus"][i]["ticks"].get<uint64_t>() <= ticks[i] + 3) return false;
        return true;
      },
      20s));
  EXPECT_GT(heartbeat_of(later), heartbeat_of(guest));
  auto verified = ASSERT_OK(vm.command("guest-verify", {{"timeout", 120}}));
  EXPECT_EQ(verified["mismatches"], 0) << verified.dump();
  EXPECT_EQ(verified["pages_checked"], later["pages_total"]);
}

struct Identity {
  uint64_t inode, device;
  bool operator==(const Identity&) const = default;
};
std::map<std::string, Identity> region_identities(VmmProcess& vm) {
  std::map<std::string, Identity> out;
  auto regions = vm.command("query-memory");
  if (!regions) return out;
  for (const auto& region : *regions)
    out[region["name"]] = {region["inode"].get<uint64_t>(), region["device"].get<uint64_t>()};
  return out;
}

// The modes that move the VM to a new vmm binary.
class EveryMode : public ::testing::TestWithParam<const char*> {};
INSTANTIATE_TEST_SUITE_P(Modes, EveryMode, ::testing::Values("transfer", "exec"));

TEST_P(EveryMode, UpdateKeepsMemoryInPlaceAndTheGuestCarriesOn) {
  REQUIRE_KVM();
  const std::string mode = GetParam();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2", "--memory", "256M"}));
  ASSERT_OK(wait_stamped(vm));
  ASSERT_OK(vm.command("guest-verify"));
  const auto before = region_identities(vm);
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));
  const pid_t old_pid = vm.pid();

  auto reply = ASSERT_OK(live_update(vm, mode));
  EXPECT_EQ(reply["status"], "completed");
  EXPECT_EQ(reply["mode"], mode);
  EXPECT_EQ(reply["generation"], 1);
  EXPECT_GT(reply["blackout_us"].get<int64_t>(), 0);
  if (mode == "exec") {
    EXPECT_EQ(phases_of(reply), (std::vector<std::string>{"prepare", "freeze", "handover", "restore", "finish"}));
    EXPECT_EQ(vm.pid(), old_pid) << "exec keeps the process";
  } else {
    EXPECT_EQ(phases_of(reply), (std::vector<std::string>{"prepare", "freeze", "handover", "restore"}));
    EXPECT_NE(vm.pid(), old_pid) << "transfer moves the VM to a new process, and the old one exited 0";
  }

  // Zero copy: the very same files back every region, and none of the
  // guest's RAM became anonymous memory.
  EXPECT_EQ(region_identities(vm), before);
  for (const auto& region : ASSERT_OK(vm.command("query-memory")))
    EXPECT_EQ(region["slot"], "userspace") << "after the update every region is attached through its mapping";
  EXPECT_LT(rss_anon_kib(vm.pid()), 64u * 1024) << "RssAnon stays far below the guest's 256 MiB";
  // And the same physical pages: the frames sampled before the pause, again
  // after the resume (frame numbers are shown to root only).
  if (::geteuid() == 0) {
    ASSERT_TRUE(reply.contains("frames")) << reply.dump();
    EXPECT_GT(reply["frames"]["sampled"].get<uint64_t>(), 8u) << reply.dump();
    EXPECT_EQ(reply["frames"]["same"], reply["frames"]["sampled"]) << reply.dump();
  }

  expect_guest_carries_on(vm, heartbeat, 2);
  auto record = ASSERT_OK(vm.command("query-live-update"));
  EXPECT_EQ(record["status"], "completed");
  EXPECT_TRUE(record.contains("guest_gap_us")) << record.dump();
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
}

class RepeatedUpdates : public ::testing::TestWithParam<std::tuple<const char*, const char*>> {};

TEST_P(RepeatedUpdates, TwentyUpdatesInARowVerifiedAfterEach) {
  REQUIRE_KVM();
  const auto [mode, backing] = GetParam();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2", "--memory", "256M", "--memory-backing", backing}));
  ASSERT_OK(wait_stamped(vm));
  const auto identities = region_identities(vm);
  for (int generation = 1; generation <= 20; ++generation) {
    SCOPED_TRACE("update " + std::to_string(generation));
    const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));
    auto reply = ASSERT_OK(live_update(vm, mode));
    ASSERT_EQ(reply["generation"], generation);
    ASSERT_EQ(region_identities(vm), identities);
    auto guest = ASSERT_OK(vm.wait_guest([&](const json& g) { return heartbeat_of(g) > heartbeat + 2; }, 20s));
    auto verified = ASSERT_OK(vm.command("guest-verify", {{"timeout", 120}}));
    ASSERT_EQ(verified["mismatches"], 0) << verified.dump();
    ASSERT_EQ(verified["pages_checked"], guest["pages_total"]);
  }
  EXPECT_LT(rss_anon_kib(vm.pid()), 64u * 1024);
}
INSTANTIATE_TEST_SUITE_P(ModesAndBackings, RepeatedUpdates,
                         ::testing::Combine(::testing::Values("transfer", "exec"),
                                            ::testing::Values("guest_memfd", "memfd")),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param)) + "_" + std::get<1>(info.param);
                         });

TEST_P(EveryMode, PausedVmStaysPausedWithItsMemoryUnchanged) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}));
  ASSERT_OK(wait_stamped(vm));
  ASSERT_OK(vm.command("stop"));
  const auto hash_before = ASSERT_OK(vm.command("query-memory-hash"));
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));

  auto reply = ASSERT_OK(live_update(vm, GetParam()));
  EXPECT_EQ(reply["status"], "completed");
  {
    const json status = ASSERT_OK(vm.command("query-status"));
    EXPECT_EQ(status["status"], "paused") << status.dump();
    EXPECT_EQ(status["running"], false) << status.dump();
  }
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(heartbeat_of(ASSERT_OK(vm.command("query-guest"))), heartbeat) << "still frozen";
  EXPECT_EQ(ASSERT_OK(vm.command("query-memory-hash")), hash_before) << "not a byte of guest memory changed";

  ASSERT_OK(vm.command("cont"));
  expect_guest_carries_on(vm, heartbeat, 2);
}

TEST_P(EveryMode, ControlSocketNeverRefusesAConnectionDuringTheUpdate) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  ASSERT_OK(wait_stamped(vm));
  std::atomic<bool> done{false};
  std::atomic<int> attempts{0}, refused{0};
  std::thread prober([&] {
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, vm.socket_path().c_str(), sizeof address.sun_path - 1);
    while (!done) {
      int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) ++refused;
      ++attempts;
      ::close(fd);
      std::this_thread::sleep_for(200us);
    }
  });
  for (int i = 0; i < 3; ++i) {
    auto updated = live_update(vm, GetParam());
    if (!updated) {
      done = true;
      prober.join();
      FAIL() << updated.error().describe();
    }
  }
  done = true;
  prober.join();
  EXPECT_GT(attempts.load(), 10);
  EXPECT_EQ(refused.load(), 0) << "no client ever sees connection refused";
}

// Polls query-live-update until the brown-out is no longer pending.
Result<json> wait_brownout(VmmProcess& vm, std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  json record;
  while (std::chrono::steady_clock::now() < deadline) {
    VMM_TRY_ASSIGN(current, vm.command("query-live-update"));
    record = current;
    if (record.value("brownout_status", "") != "pending") return record;
    std::this_thread::sleep_for(20ms);
  }
  return fail("the brown-out stayed pending: " + record.dump());
}

// A rebuilt VM re-faults the guest's pages: the update reports how long the
// guest's pass over all of its RAM stayed slower than before.
TEST_P(EveryMode, BrownOutIsMeasuredFromTheGuestsRamSweep) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "256M", "--cmdline", "sweep-ms=20"}));
  ASSERT_OK(wait_stamped(vm));
  ASSERT_OK(vm.wait_guest([](const json& g) { return g["sweep"]["passes"].get<uint64_t>() >= 4; }, 20s));
  ASSERT_OK(live_update(vm, GetParam()));
  auto record = ASSERT_OK(wait_brownout(vm, 60s));
  ASSERT_EQ(record["brownout_status"], "measured") << record.dump();
  EXPECT_GT(record["baseline_pass_us"].get<int64_t>(), 0);
  // Re-faulting 256 MiB costs this host ~1 s; the pass after it is fast again.
  EXPECT_GT(record["brownout_us"].get<int64_t>(), record["baseline_pass_us"].get<int64_t>()) << record.dump();
  EXPECT_LT(record["brownout_us"].get<int64_t>(), 30'000'000) << record.dump();
}

TEST(LiveUpdate, TransferWithoutPrefaultStillKeepsEveryPage) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}));
  ASSERT_OK(wait_stamped(vm));
  const auto identities = region_identities(vm);
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));
  auto reply = ASSERT_OK(live_update(vm, "transfer", {{"prefault", false}}));
  EXPECT_EQ(reply["status"], "completed");
  EXPECT_EQ(region_identities(vm), identities);
  expect_guest_carries_on(vm, heartbeat, 2);
}

TEST(LiveUpdate, BrownOutIsUnavailableWithoutTheGuestsSweep) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  ASSERT_OK(wait_stamped(vm));
  ASSERT_OK(live_update(vm, "transfer"));
  auto record = ASSERT_OK(wait_brownout(vm, 10s));
  EXPECT_EQ(record["brownout_status"], "unavailable");
  EXPECT_NE(record.value("brownout_reason", "").find("sweep-ms"), std::string::npos) << record.dump();
  EXPECT_FALSE(record.contains("brownout_us"));
}

TEST(LiveUpdate, KexecModeFailsClearlyHereAndTheGuestContinues) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  ASSERT_OK(wait_stamped(vm));
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));
  // A kernel image that exists (its content does not matter: the update
  // stops at the missing /dev/liveupdate before any kexec system call).
  const std::string kernel = vm.directory() + "/bzImage";
  std::ofstream(kernel) << "not really a kernel";
  auto reply = ASSERT_OK(vm.client().execute(
      "live-update", {{"mode", "kexec"}, {"kernel", kernel}, {"cmdline", "kho=on liveupdate=on"}}));
  ASSERT_FALSE(reply.has_value());
  EXPECT_NE(reply.error().desc.find("/dev/liveupdate"), std::string::npos) << reply.error().desc;
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
  auto record = ASSERT_OK(vm.command("query-live-update"));
  EXPECT_EQ(record["status"], "failed");
  EXPECT_EQ(record["mode"], "kexec");
  EXPECT_EQ(record["generation"], 0);
  // The phase it failed in stays in the record, with its time.
  EXPECT_EQ(record.value("failed_phase", ""), "prepare") << record.dump();
  ASSERT_EQ(record["phases"].size(), 1u) << record.dump();
  EXPECT_EQ(record["phases"][0]["name"], "prepare");
  // What a kexec could do here, for a management tool to read first.
  EXPECT_EQ(record["kexec"]["liveupdate"], false) << record.dump();
  EXPECT_NE(record["kexec"].value("unavailable", "").find("/dev/liveupdate"), std::string::npos) << record.dump();
  // No LUO agent here: the device alone, as before there was one.
  EXPECT_EQ(record["kexec"]["session_source"], "device") << record.dump();
  expect_guest_carries_on(vm, heartbeat, 1);
}

struct PrepareFailure {
  const char* name;
  json arguments;
  const char* expected;  // in the error's desc
};
void PrintTo(const PrepareFailure& f, std::ostream* out) { *out << f.name; }

class FailureBeforeHandover : public ::testing::TestWithParam<PrepareFailure> {};

// Each failure cancels the session, resumes the guest and loses nothing; the
// next update then works.
TEST_P(FailureBeforeHandover, CancelsResumesAndLosesNothing) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}, std::chrono::seconds(30), vmm_faults_binary()));
  ASSERT_OK(wait_stamped(vm));
  const auto identities = region_identities(vm);
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));

  auto reply = ASSERT_OK(vm.client().execute("live-update", GetParam().arguments));
  ASSERT_FALSE(reply.has_value()) << "the update must fail";
  EXPECT_NE(reply.error().desc.find(GetParam().expected), std::string::npos) << reply.error().desc;
  EXPECT_NE(reply.error().desc.find("memory is intact"), std::string::npos) << reply.error().desc;
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
  auto record = ASSERT_OK(vm.command("query-live-update"));
  EXPECT_EQ(record["status"], "failed");
  EXPECT_EQ(record["generation"], 0);
  EXPECT_TRUE(record.contains("error"));
  expect_guest_carries_on(vm, heartbeat, 2);

  // The cancelled session freed its name: the next update goes through.
  auto retried = ASSERT_OK(exec_update(vm));
  EXPECT_EQ(retried["generation"], 1);
  EXPECT_EQ(region_identities(vm), identities);
  expect_guest_carries_on(vm, heartbeat, 2);
}

INSTANTIATE_TEST_SUITE_P(
    Injected, FailureBeforeHandover,
    ::testing::Values(
        PrepareFailure{"FdTheBackendRefuses", {{"mode", "exec"}, {"x-inject", "preserve-refused"}}, "prepare"},
        PrepareFailure{"StateLargerThanItsMemfd", {{"mode", "exec"}, {"x-inject", "state-too-large"}},
                       "does not fit"},
        PrepareFailure{"ExecOfAMissingBinary", {{"mode", "exec"}, {"binary", "/nonexistent/vmm"}}, "/nonexistent/vmm"},
        PrepareFailure{"KexecWithoutKernelImage", {{"mode", "kexec"}, {"kernel", "/nonexistent/bzImage"}},
                       "cannot open the kexec image '/nonexistent/bzImage'"},
        PrepareFailure{"TransferToAMissingBinary", {{"mode", "transfer"}, {"binary", "/nonexistent/vmm"}},
                       "cannot run the new vmm '/nonexistent/vmm'"},
        PrepareFailure{"TransferTargetCannotBuildTheVm", {{"mode", "transfer"}, {"x-inject", "target-refuses"}},
                       "refuses to build the VM"},
        PrepareFailure{"TransferStateLargerThanItsMemfd", {{"mode", "transfer"}, {"x-inject", "state-too-large"}},
                       "does not fit"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(LiveUpdate, BadArgumentsAreRefusedWithoutTouchingTheGuest) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  for (const json& arguments : {json::object(), json{{"mode", "teleport"}}, json{{"mode", 7}},
                                json{{"mode", "exec"}, {"kernel", "/boot/vmlinuz"}},
                                json{{"mode", "kexec"}}, json{{"mode", "exec"}, {"x-inject", "gremlins"}},
                                json{{"mode", "exec"}, {"speed", "fast"}},
                                json{{"mode", "transfer"}, {"kernel", "/boot/vmlinuz"}},
                                json{{"mode", "transfer"}, {"x-inject", "wrong-token"}},
                                json{{"mode", "exec"}, {"x-inject", "target-crash"}},
                                json{{"mode", "exec"}, {"prefault", false}},
                                json{{"mode", "transfer"}, {"prefault", "yes"}}}) {
    auto reply = ASSERT_OK(vm.client().execute("live-update", arguments));
    ASSERT_FALSE(reply.has_value()) << arguments.dump();
    EXPECT_EQ(reply.error().error_class, "GenericError");
  }
  EXPECT_EQ(ASSERT_OK(vm.command("query-live-update"))["status"], "none");
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
}

}  // namespace
}  // namespace vmm::testing

namespace vmm::testing {
namespace {

// A fault injected into the new process, and what its error must name.
struct InjectedFault {
  const char* fault;
  const char* expected;  // names the cause in the error
};
void PrintTo(const InjectedFault& f, std::ostream* out) { *out << f.fault; }
std::string fault_test_name(const ::testing::TestParamInfo<InjectedFault>& info) {
  std::string name = info.param.fault;
  std::ranges::replace(name, '-', '_');
  return name;
}

class FailureDuringRestore : public ::testing::TestWithParam<InjectedFault> {};

// The new process fails to restore: it reports why, writes no guest memory,
// leaves the session unfinished and hands it back to the previous vmm, which
// restores the VM. The client gets the error; the guest just carries on.
TEST_P(FailureDuringRestore, IsReportedAndTheRollbackRestoresTheVm) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}, std::chrono::seconds(30), vmm_faults_binary()));
  ASSERT_OK(wait_stamped(vm));
  const auto identities = region_identities(vm);
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));

  auto reply = ASSERT_OK(vm.client().execute("live-update", {{"mode", "exec"}, {"x-inject", GetParam().fault}}));
  ASSERT_FALSE(reply.has_value()) << "the update must fail";
  const std::string& desc = reply.error().desc;
  EXPECT_NE(desc.find("failed during restore"), std::string::npos) << desc;
  EXPECT_NE(desc.find(GetParam().expected), std::string::npos) << desc;
  EXPECT_NE(desc.find("rolled back"), std::string::npos) << desc;

  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
  EXPECT_EQ(region_identities(vm), identities) << "the same memory, never copied";
  auto record = ASSERT_OK(vm.command("query-live-update"));
  EXPECT_EQ(record["status"], "failed");
  EXPECT_EQ(record["generation"], 0);
  expect_guest_carries_on(vm, heartbeat, 2);

  // Nothing is left half done: the next update works.
  auto retried = ASSERT_OK(exec_update(vm));
  EXPECT_EQ(retried["generation"], 1);
  expect_guest_carries_on(vm, heartbeat, 2);
}

INSTANTIATE_TEST_SUITE_P(Injected, FailureDuringRestore,
                         ::testing::Values(InjectedFault{"corrupt-state", "checksum"},
                                           InjectedFault{"wrong-token", "token"},
                                           InjectedFault{"wrong-vm-token", "VM with token"},
                                           InjectedFault{"give-up-after-rebuild", "rebuilt the VM"}),
                         fault_test_name);

class TransferFailsAfterThePause : public ::testing::TestWithParam<InjectedFault> {};

// The new process fails, or dies, after the old one paused the guest and
// sent the state: before "commit" it never ran the guest, so the old vmm
// resumes its own VM, answers the client, and the next transfer works.
TEST_P(TransferFailsAfterThePause, TheOldVmmResumesItsVm) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}, std::chrono::seconds(30), vmm_faults_binary()));
  json arguments = {{"mode", "transfer"}, {"x-inject", GetParam().fault}};
  // The crossing of "loaded" and the old side's deadline, without waiting 30 s.
  if (std::string(GetParam().fault) == "delay-loaded") arguments["x-commit-timeout-ms"] = 200;
  ASSERT_OK(wait_stamped(vm));
  const auto identities = region_identities(vm);
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));
  const pid_t old_pid = vm.pid();

  auto reply = ASSERT_OK(vm.client().execute("live-update", arguments));
  ASSERT_FALSE(reply.has_value()) << "the update must fail";
  const std::string& desc = reply.error().desc;
  EXPECT_NE(desc.find("failed during handover"), std::string::npos) << desc;
  EXPECT_NE(desc.find(GetParam().expected), std::string::npos) << desc;
  EXPECT_NE(desc.find("memory is intact"), std::string::npos) << desc;
  EXPECT_EQ(vm.pid(), old_pid);
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
  EXPECT_EQ(region_identities(vm), identities);
  auto record = ASSERT_OK(vm.command("query-live-update"));
  EXPECT_EQ(record["status"], "failed");
  EXPECT_EQ(record["generation"], 0);
  expect_guest_carries_on(vm, heartbeat, 2);

  auto retried = ASSERT_OK(live_update(vm, "transfer"));
  EXPECT_EQ(retried["generation"], 1);
  EXPECT_EQ(region_identities(vm), identities);
  expect_guest_carries_on(vm, heartbeat, 2);
}

INSTANTIATE_TEST_SUITE_P(Injected, TransferFailsAfterThePause,
                         ::testing::Values(InjectedFault{"corrupt-state", "checksum"},
                                           InjectedFault{"target-crash", "exited before sending 'loaded'"},
                                           // "loaded" arrives after the old side gave up: it meets
                                           // "abort", and only the old process ever runs the guest.
                                           InjectedFault{"delay-loaded", "timed out"}),
                         fault_test_name);

TEST_P(EveryMode, PausedVmStaysPausedThroughARollback) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}, std::chrono::seconds(30), vmm_faults_binary()));
  ASSERT_OK(wait_stamped(vm));
  ASSERT_OK(vm.command("stop"));
  const auto hash_before = ASSERT_OK(vm.command("query-memory-hash"));
  auto reply = ASSERT_OK(vm.client().execute("live-update", {{"mode", GetParam()}, {"x-inject", "corrupt-state"}}));
  ASSERT_FALSE(reply.has_value());
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "paused");
  EXPECT_EQ(ASSERT_OK(vm.command("query-memory-hash")), hash_before);
}

}  // namespace
}  // namespace vmm::testing

namespace vmm::testing {
namespace {

// A file in the VM's test directory that runs `body` (a shell script).
std::string write_script(const VmmProcess& vm, const std::string& name, const std::string& body) {
  const std::string path = vm.directory() + "/" + name;
  {
    std::ofstream out(path);
    out << "#!/bin/sh\n" << body << "\n";
  }
  ::chmod(path.c_str(), 0755);
  return path;
}

// The update is refused before the pause: the guest never stopped, nothing
// changed, and the next update goes through.
void expect_refused_before_the_pause(VmmProcess& vm, const json& arguments, const std::string& expected) {
  const auto identities = region_identities(vm);
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));
  const pid_t pid = vm.pid();
  auto reply = ASSERT_OK(vm.client().execute("live-update", arguments));
  ASSERT_FALSE(reply.has_value()) << "the update must be refused: " << arguments.dump();
  const std::string& desc = reply.error().desc;
  EXPECT_NE(desc.find("failed during prepare"), std::string::npos) << desc;
  EXPECT_NE(desc.find(expected), std::string::npos) << desc;
  EXPECT_NE(desc.find("the guest kept running"), std::string::npos) << desc;
  EXPECT_EQ(vm.pid(), pid);
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
  auto record = ASSERT_OK(vm.command("query-live-update"));
  EXPECT_EQ(record["status"], "failed");
  EXPECT_EQ(record["generation"], 0);
  ASSERT_EQ(record["phases"].size(), 1u) << "nothing after prepare ran: " << record.dump();
  EXPECT_EQ(record["phases"][0]["name"], "prepare");
  EXPECT_EQ(record["failed_phase"], "prepare");
  expect_guest_carries_on(vm, heartbeat, 1);
  auto retried = ASSERT_OK(live_update(vm, arguments["mode"].get<std::string>()));
  EXPECT_EQ(retried["generation"], 1);
  EXPECT_EQ(region_identities(vm), identities);
}

class VersionSkew : public ::testing::TestWithParam<std::string> {};

// A new binary that speaks another handover version is asked before the
// pause and refused: the guest keeps running in the old vmm.
TEST_P(VersionSkew, ANewBinaryOfAnotherHandoverVersionIsRefusedBeforeThePause) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  ASSERT_OK(wait_stamped(vm));
  expect_refused_before_the_pause(vm, {{"mode", GetParam()}, {"binary", vmm_skewed_binary()}},
                                  "speaks other handover formats (handover record 1 here, 99 there)");
}

// Binaries that are not a vmm: one that fails, one that exits 0 saying
// nothing, one that prints something else.
TEST_P(VersionSkew, ABinaryThatIsNotAVmmIsRefusedBeforeThePause) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  ASSERT_OK(wait_stamped(vm));
  const std::string silent = write_script(vm, "silent", "exit 0");
  const std::string chatty = write_script(vm, "chatty", "echo '{\"hello\": 1}'");
  for (const auto& [binary, expected] : std::vector<std::pair<std::string, std::string>>{
           {"/bin/false", "exited with status 1"},
           {silent, "printed no handover versions"},
           {chatty, "lack 'handover'"}}) {
    SCOPED_TRACE(binary);
    const auto identities = region_identities(vm);
    auto reply = ASSERT_OK(vm.client().execute("live-update", {{"mode", GetParam()}, {"binary", binary}}));
    ASSERT_FALSE(reply.has_value());
    EXPECT_NE(reply.error().desc.find("is not a vmm that can take this VM over"), std::string::npos)
        << reply.error().desc;
    EXPECT_NE(reply.error().desc.find(expected), std::string::npos) << reply.error().desc;
    EXPECT_NE(reply.error().desc.find("the guest kept running"), std::string::npos) << reply.error().desc;
    EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
    EXPECT_EQ(region_identities(vm), identities);
  }
  auto retried = ASSERT_OK(live_update(vm, GetParam()));
  EXPECT_EQ(retried["generation"], 1);
}

// Were a binary of another version to get the handover anyway (the check
// skipped by a test fault), it cannot read the record: exec rolls back to the
// previous binary, transfer's old vmm resumes its own VM. The guest is never lost.
TEST_P(VersionSkew, ANewBinaryThatCannotReadTheHandoverGivesTheVmBack) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}, std::chrono::seconds(30), vmm_faults_binary()));
  ASSERT_OK(wait_stamped(vm));
  const auto identities = region_identities(vm);
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));
  const pid_t pid = vm.pid();
  auto reply = ASSERT_OK(vm.client().execute(
      "live-update", {{"mode", GetParam()}, {"binary", vmm_skewed_binary()}, {"x-inject", "skip-version-check"}}));
  ASSERT_FALSE(reply.has_value()) << "the update must fail";
  const std::string& desc = reply.error().desc;
  EXPECT_NE(desc.find("handover record is version 1.0 but this vmm reads only major version 99"), std::string::npos)
      << desc;
  if (GetParam() == "exec") EXPECT_NE(desc.find("rolled back"), std::string::npos) << desc;
  else EXPECT_NE(desc.find("the guest is running again"), std::string::npos) << desc;
  EXPECT_EQ(vm.pid(), pid);
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
  EXPECT_EQ(region_identities(vm), identities);
  EXPECT_EQ(ASSERT_OK(vm.command("query-live-update"))["status"], "failed");
  expect_guest_carries_on(vm, heartbeat, 2);
  auto verified = ASSERT_OK(vm.command("guest-verify", {{"timeout", 60}}));
  EXPECT_EQ(verified["mismatches"], 0);
  auto retried = ASSERT_OK(live_update(vm, GetParam()));
  EXPECT_EQ(retried["generation"], 1);
  EXPECT_EQ(region_identities(vm), identities);
}

INSTANTIATE_TEST_SUITE_P(Modes, VersionSkew, ::testing::Values("exec", "transfer"),
                         [](const auto& info) { return info.param; });

// The new process resumes the guest only when the old one says "go": held
// back 300 ms, the blackout is at least that long, and the update completes.
TEST(TransferCommit, TheNewVmmWaitsForGo) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "2"}, std::chrono::seconds(30), vmm_faults_binary()));
  ASSERT_OK(wait_stamped(vm));
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));
  auto reply = ASSERT_OK(live_update(vm, "transfer", {{"x-inject", "delay-go"}}));
  EXPECT_EQ(reply["status"], "completed");
  EXPECT_GE(reply["blackout_us"].get<int64_t>(), 300'000);
  expect_guest_carries_on(vm, heartbeat, 2);
}

// The production vmm has no test hooks: x-inject is an unknown parameter.
TEST(FaultInjection, IsUnknownToAProductionVmm) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  for (const char* mode : {"exec", "transfer", "kexec"}) {
    json arguments = {{"mode", mode}, {"x-inject", "corrupt-state"}};
    if (std::string(mode) == "kexec") arguments["kernel"] = "/nonexistent";
    auto reply = ASSERT_OK(vm.client().execute("live-update", arguments));
    ASSERT_FALSE(reply.has_value());
    EXPECT_EQ(reply.error().desc, "Parameter 'x-inject' is unexpected for command live-update");
  }
  EXPECT_EQ(ASSERT_OK(vm.command("query-live-update"))["status"], "none");
}

}  // namespace
}  // namespace vmm::testing

namespace vmm::testing {
namespace {

// SIGTERM while a transfer waits for its new process: the update stops
// waiting, and the reply says what really happens (the VM stops with the
// vmm), never that the guest runs again.
TEST(LiveUpdateShutdown, SigtermDuringATransfersPrepareIsReportedTruthfully) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  ASSERT_OK(wait_stamped(vm));
  // A new vmm that answers the version check at once but takes long to start.
  const std::string slow = write_script(
      vm, "slow-vmm", "if [ \"$1\" = transfer-target ]; then sleep 5; fi\nexec " + vmm_binary() + " \"$@\"");
  std::optional<Result<control::CommandResult>> reply;
  std::thread update([&] { reply = vm.client().execute("live-update", {{"mode", "transfer"}, {"binary", slow}}); });
  std::this_thread::sleep_for(1s);
  const auto signalled = std::chrono::steady_clock::now();
  vm.signal(SIGTERM);
  update.join();
  auto exit = vm.wait_exit(10s);
  ASSERT_TRUE(exit.has_value()) << "the vmm must exit on SIGTERM during the update";
  EXPECT_LT(std::chrono::steady_clock::now() - signalled, 5s) << "it stopped waiting for the new process";
  ASSERT_TRUE(reply.has_value());
  if (*reply && !(**reply).has_value()) {
    const std::string& desc = (**reply).error().desc;
    EXPECT_NE(desc.find("shutting down"), std::string::npos) << desc;
    EXPECT_EQ(desc.find("running again"), std::string::npos) << desc;
    EXPECT_EQ(desc.find("memory is intact"), std::string::npos) << desc;
  } else {
    // The connection may close before the reply is written; what must never
    // happen is a success.
    EXPECT_FALSE(*reply && (**reply).has_value()) << "the update cannot have succeeded";
  }
}

// Large payloads: 12 vCPUs' CPUID (beyond one 64 KiB channel message) and a
// client's request id of 60 KiB (the control socket takes lines up to 64 KiB)
// cross in every mode.
TEST(LiveUpdateLimits, TwelveVcpusAndALongRequestIdCrossInEveryMode) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--vcpus", "12", "--memory", "128M"}, std::chrono::seconds(60)));
  ASSERT_OK(wait_stamped(vm));
  const uint64_t heartbeat = heartbeat_of(ASSERT_OK(vm.command("query-guest")));
  for (const char* mode : {"transfer", "exec"}) {
    SCOPED_TRACE(mode);
    auto reply = ASSERT_OK(live_update(vm, mode));
    EXPECT_EQ(reply["status"], "completed");
  }
  expect_guest_carries_on(vm, heartbeat, 12);
  // The id comes back exactly, after the VM moved to the new process.
  auto client = ASSERT_OK(vm.connect());
  const std::string id(60 * 1024, 'i');
  for (const char* mode : {"transfer", "exec"}) {
    SCOPED_TRACE(mode);
    auto raw = ASSERT_OK(client.request({{"execute", "live-update"}, {"arguments", {{"mode", mode}}}, {"id", id}}));
    ASSERT_TRUE(raw.contains("return")) << raw.dump().substr(0, 500);
    EXPECT_EQ(raw["id"], id);
    ASSERT_SUCCESS(vm.follow(static_cast<pid_t>(raw["return"]["pid"].get<int64_t>())));
  }
  // The kept client's connection went with the first vmm; this one crossed with the VM.
  auto record = ASSERT_OK(client.request({{"execute", "query-live-update"}}));
  EXPECT_EQ(record["return"]["generation"], 4) << record.dump();
}

// The new process of a transfer checks the type of every field the old one
// sends: a wrong one is reported on the channel, never an abort.
TEST(TransferTarget, WronglyTypedFieldsAreReportedNotThrown) {
  for (const json& hello : {json{{"kind", "hello"}, {"name", 5}, {"vcpus", 1}, {"prefault", true}, {"regions", json::array()}},
                            json{{"kind", "hello"}, {"name", "vm"}, {"vcpus", "two"}, {"prefault", true}, {"regions", json::array()}},
                            json{{"kind", "hello"}, {"name", "vm"}, {"vcpus", 1}, {"prefault", "yes"}, {"regions", json::array()}},
                            json{{"kind", "hello"}, {"name", "vm"}, {"vcpus", 1}, {"prefault", true}, {"regions", 7}},
                            json{{"kind", "hello"}, {"name", "vm"}, {"vcpus", 1}, {"prefault", true}, {"regions", json::array()}, {"cpuid", "zz"}},
                            json{{"kind", 3}}}) {
    SCOPED_TRACE(hello.dump());
    int ends[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET, 0, ends), 0);
    ::fcntl(ends[0], F_SETFD, FD_CLOEXEC);
    // The message the old vmm would send, with the one file it names (the state memfd).
    const int state = ::memfd_create("state", MFD_CLOEXEC);
    ASSERT_GE(state, 0);
    const std::string text = hello.dump();
    iovec iov{const_cast<char*>(text.data()), text.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr message{};
    message.msg_iov = &iov;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof control;
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(header), &state, sizeof state);
    ASSERT_EQ(::sendmsg(ends[0], &message, 0), static_cast<ssize_t>(text.size()));
    ::close(state);
    auto ran = ASSERT_OK(VmmProcess::run_to_exit({"transfer-target", "--channel-fd", std::to_string(ends[1])}));
    ::close(ends[1]);
    EXPECT_TRUE(ran.first.exited) << "killed by signal " << ran.first.code << "\n" << ran.second;
    EXPECT_EQ(ran.first.code, 1) << ran.second;
    char answer[4096] = {};
    const ssize_t n = ::recv(ends[0], answer, sizeof answer - 1, MSG_DONTWAIT);
    ::close(ends[0]);
    ASSERT_GT(n, 0) << "the new process must say why on the channel";
    const json reply = json::parse(std::string(answer, static_cast<size_t>(n)), nullptr, false);
    EXPECT_EQ(reply.value("kind", ""), "error") << answer;
  }
}

}  // namespace
}  // namespace vmm::testing

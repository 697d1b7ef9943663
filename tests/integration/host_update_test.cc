// vmmctl host-update against real vmms: the coordinated kexec update of
// every VM in a folder of control sockets. This machine cannot kexec (no
// /dev/liveupdate), so here every VM's prepare fails and the upgrade must be
// cancelled for all of them, each guest running on untouched; the kexec lab
// (docs/kexec-lab.md) runs the whole upgrade on a real LUO kernel.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

struct VmmctlRun {
  int exit_status = -1;
  std::string output;
};

VmmctlRun run_vmmctl(const std::string& args) {
  VmmctlRun run;
  FILE* pipe = ::popen((std::string(VMMCTL_PATH) + " " + args + " 2>/dev/null").c_str(), "r");
  if (!pipe) return run;
  std::array<char, 4096> chunk{};
  while (size_t n = std::fread(chunk.data(), 1, chunk.size(), pipe)) run.output.append(chunk.data(), n);
  const int status = ::pclose(pipe);
  run.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

// A socket file nobody listens on: what a vmm that died leaves behind.
void make_stale_socket(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::snprintf(address.sun_path, sizeof address.sun_path, "%s", path.c_str());
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
  ::close(fd);
}

TEST(HostUpdate, AVmThatCannotPrepareCancelsTheUpgradeForEveryVm) {
  REQUIRE_KVM();
  // On a LUO host this test would upgrade the host's kernel.
  if (std::filesystem::exists("/dev/liveupdate")) GTEST_SKIP() << "a LUO host: the kexec lab tests host-update";
  std::vector<VmmProcess> vms;
  std::vector<uint64_t> heartbeats;
  for (int i = 0; i < 3; ++i) {
    vms.push_back(ASSERT_OK(VmmProcess::launch({"--memory", "64M", "--vcpus", "1"})));
  }
  char pattern[] = "/tmp/host-update-test-XXXXXX";
  ASSERT_NE(::mkdtemp(pattern), nullptr);
  const std::string dir = pattern;
  for (size_t i = 0; i < vms.size(); ++i) {
    std::filesystem::create_symlink(vms[i].socket_path(), dir + "/vm" + std::to_string(i) + ".sock");
    auto guest = ASSERT_OK(vms[i].wait_guest([](const json& g) { return g["heartbeat"].get<uint64_t>() > 0; }, 30s));
    heartbeats.push_back(guest["heartbeat"].get<uint64_t>());
  }
  make_stale_socket(dir + "/gone.sock");
  const std::string kernel = dir + "/bzImage";
  std::ofstream(kernel) << "never loaded: every VM fails its prepare first";

  VmmctlRun run = run_vmmctl("host-update --kernel " + kernel + " --dir " + dir + " --prepare-timeout 60");
  EXPECT_EQ(run.exit_status, 1) << run.output;
  json outcome = json::parse(run.output, nullptr, false);
  ASSERT_TRUE(outcome.is_object()) << run.output;
  EXPECT_EQ(outcome["status"], "cancelled") << outcome.dump();
  EXPECT_NE(outcome.value("reason", "").find("did not reach the freeze gate"), std::string::npos) << outcome.dump();
  ASSERT_EQ(outcome["vms"].size(), 3u) << "the stale socket is passed over: " << outcome.dump();
  for (const auto& vm : outcome["vms"])
    EXPECT_NE(vm["update"].get<std::string>().find("memory is intact"), std::string::npos) << vm.dump();

  for (size_t i = 0; i < vms.size(); ++i) {
    EXPECT_EQ(ASSERT_OK(vms[i].command("query-status"))["status"], "running");
    auto record = ASSERT_OK(vms[i].command("query-live-update"));
    EXPECT_EQ(record["status"], "failed") << record.dump();
    EXPECT_EQ(record.value("failed_phase", ""), "prepare") << record.dump();
    EXPECT_FALSE(record.contains("waiting")) << record.dump();
    const uint64_t before = heartbeats[i];
    ASSERT_OK(vms[i].wait_guest([&](const json& g) { return g["heartbeat"].get<uint64_t>() > before + 3; }, 10s));
  }

  // And after it, the report says no VM was restored.
  VmmctlRun report = run_vmmctl("host-report --dir " + dir);
  EXPECT_EQ(report.exit_status, 1) << report.output;
  json summary = json::parse(report.output, nullptr, false);
  ASSERT_TRUE(summary.is_object()) << report.output;
  EXPECT_EQ(summary["restored"], 0) << summary.dump();
  std::filesystem::remove_all(dir);
}

TEST(HostUpdate, TheCoordinatorsCommandsNeedACoordinatedUpdate) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--memory", "64M", "--vcpus", "1"}));
  auto refused = ASSERT_OK(vm.client().execute("live-update-continue"));
  ASSERT_FALSE(refused.has_value());
  EXPECT_NE(refused.error().desc.find("no coordinated live update"), std::string::npos) << refused.error().desc;
  auto cancel = ASSERT_OK(vm.client().execute("live-update-cancel", {{"reason", "x"}}));
  ASSERT_FALSE(cancel.has_value());
  EXPECT_NE(cancel.error().desc.find("nothing to cancel"), std::string::npos) << cancel.error().desc;
  // The coordinator loads the one kernel for every VM: a VM is given none.
  auto with_kernel = ASSERT_OK(
      vm.client().execute("live-update", {{"mode", "kexec"}, {"coordinated", true}, {"kernel", "/boot/vmlinuz"}}));
  ASSERT_FALSE(with_kernel.has_value());
  EXPECT_NE(with_kernel.error().desc.find("coordinator loads"), std::string::npos) << with_kernel.error().desc;
  auto not_kexec = ASSERT_OK(vm.client().execute("live-update", {{"mode", "exec"}, {"coordinated", true}}));
  ASSERT_FALSE(not_kexec.has_value());
  EXPECT_NE(not_kexec.error().desc.find("\"kexec\" only"), std::string::npos) << not_kexec.error().desc;
  auto not_boolean = ASSERT_OK(vm.client().execute("live-update", {{"mode", "kexec"}, {"coordinated", "yes"}}));
  ASSERT_FALSE(not_boolean.has_value());
  EXPECT_NE(not_boolean.error().desc.find("expects a boolean"), std::string::npos) << not_boolean.error().desc;
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
}

}  // namespace
}  // namespace vmm::testing

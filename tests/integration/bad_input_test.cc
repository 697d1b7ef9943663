// Bad input on the command line and on the control socket: one clear error,
// a non-zero exit, nothing left behind; the guest keeps running untouched.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

struct BadRun {
  const char* name;
  std::vector<std::string> args;
  const char* expected;  // a phrase the one error line must contain
};

void PrintTo(const BadRun& bad, std::ostream* out) { *out << bad.name; }

class BadCommandLine : public ::testing::TestWithParam<BadRun> {};

TEST_P(BadCommandLine, OneClearErrorAndNothingLeftBehind) {
  const BadRun& bad = GetParam();
  const auto dir = std::filesystem::temp_directory_path() / ("vmm-bad-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string socket = (dir / "vmm.sock").string();
  std::vector<std::string> args{"run"};
  for (const char* option : {"--control-socket", "--console"}) {
    if (std::ranges::find(bad.args, option) == bad.args.end())
      args.insert(args.end(), {option, std::string(option) == "--console" ? "none" : socket});
  }
  args.insert(args.end(), bad.args.begin(), bad.args.end());
  auto [status, err] = ASSERT_OK(VmmProcess::run_to_exit(args));
  EXPECT_TRUE(status.exited);
  EXPECT_NE(status.code, 0);
  EXPECT_NE(err.find(bad.expected), std::string::npos) << "stderr: " << err;
  // One line: the error, nothing else.
  EXPECT_EQ(std::ranges::count(err, '\n'), 1) << "stderr: " << err;
  EXPECT_FALSE(std::filesystem::exists(socket)) << "no socket left behind";
  std::filesystem::remove_all(dir);
}

std::string write_temp_file(const std::string& name, const std::string& content) {
  const auto path = std::filesystem::temp_directory_path() / name;
  std::ofstream(path) << content;
  return path.string();
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadCommandLine,
    ::testing::Values(
        BadRun{"ZeroMemory", {"--memory", "0"}, "RAM size is 0"},
        BadRun{"UnalignedMemory", {"--memory", "1000"}, "page"},
        BadRun{"MemoryNotASize", {"--memory", "lots"}, "not a size"},
        BadRun{"MemoryBadSuffix", {"--memory", "12Q"}, "suffix"},
        BadRun{"MemoryLargerThanHost", {"--memory", "8T"}, "the host cannot provide it"},
        BadRun{"MemoryLargerThanAddressSpace", {"--memory", "64T"}, "address space"},
        BadRun{"ZeroVcpus", {"--vcpus", "0"}, "--vcpus"},
        BadRun{"TooManyVcpus", {"--vcpus", "999"}, "--vcpus"},
        BadRun{"UnknownBacking", {"--memory-backing", "tmpfs"}, "--memory-backing"},
        BadRun{"SharedTooLarge", {"--shared-memory", "1G"}, "shared"},
        BadRun{"SharedSmallerThanTheGuestProtocol", {"--shared-memory", "4K"}, "use at least 8 KiB"},
        BadRun{"MissingKernel", {"--kernel", "/nonexistent/vmlinux"}, "cannot open kernel"},
        BadRun{"KernelNotElf", {"--kernel", "/etc/hostname"}, "not an ELF"},
        BadRun{"KernelNotPvh", {"--kernel", "/bin/true"}, "not a PVH kernel"},
        BadRun{"NoKvmDevice", {"--kvm-device", "/nonexistent/kvm"}, "/nonexistent/kvm"},
        BadRun{"SocketDirectoryMissing", {"--control-socket", "/nonexistent/dir/vmm.sock"}, "control socket directory"},
        BadRun{"BadLogLevel", {"--log-level", "loud"}, "--log-level"},
        BadRun{"ConsoleFileInMissingDir", {"--console", "/nonexistent/dir/console.log"}, "console"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(BadCommandLineSocket, ExistingSocketPathIsRefusedAndKept) {
  const std::string path = write_temp_file("vmm-existing-" + std::to_string(::getpid()), "not mine");
  auto [status, err] = ASSERT_OK(VmmProcess::run_to_exit({"run", "--control-socket", path, "--console", "none"}));
  EXPECT_NE(status.code, 0);
  EXPECT_NE(err.find("already exists"), std::string::npos) << err;
  std::ifstream in(path);
  std::string content;
  std::getline(in, content);
  EXPECT_EQ(content, "not mine") << "someone else's file is untouched";
  std::filesystem::remove(path);
}

TEST(BadCommandLineSocket, HelpExplainsEveryOption) {
  auto [status, out] = ASSERT_OK(VmmProcess::run_to_exit({"run", "--help"}));
  (void)out;
  EXPECT_EQ(status.code, 0);
}

// Bad control-socket input against a real running guest: each gets its
// error, and the guest keeps beating.
TEST(BadControlInput, GuestKeepsRunningThroughBadInput) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({}));
  auto before = ASSERT_OK(vm.wait_guest([](const json& g) { return g["heartbeat"].get<uint64_t>() > 0; }, 10s));

  auto raw = ASSERT_OK(control::Client::connect(vm.socket_path()));
  // Before negotiation.
  auto early = ASSERT_OK(raw.request(json{{"execute", "query-status"}}));
  EXPECT_EQ(early["error"]["class"], "CommandNotFound");
  ASSERT_SUCCESS(raw.negotiate());
  auto malformed = ASSERT_OK(raw.request_line("{\"execute\": "));
  EXPECT_EQ(malformed["error"]["class"], "GenericError");
  auto not_object = ASSERT_OK(raw.request_line("[1, 2, 3]"));
  EXPECT_EQ(not_object["error"]["class"], "GenericError");
  auto unknown = ASSERT_OK(raw.request(json{{"execute", "reboot-the-world"}, {"id", 7}}));
  EXPECT_EQ(unknown["error"]["class"], "CommandNotFound");
  EXPECT_EQ(unknown["id"], 7);
  auto wrong_type = ASSERT_OK(raw.request(json{{"execute", "guest-verify"}, {"arguments", {{"timeout", "soon"}}}}));
  EXPECT_EQ(wrong_type["error"]["class"], "GenericError");
  EXPECT_NE(wrong_type["error"]["desc"].get<std::string>().find("timeout"), std::string::npos);
  auto extra_argument = ASSERT_OK(raw.request(json{{"execute", "stop"}, {"arguments", {{"force", true}}}}));
  EXPECT_EQ(extra_argument["error"]["class"], "GenericError");

  // A silent client and one that hangs up mid-line.
  auto silent = ASSERT_OK(control::Client::connect(vm.socket_path()));
  {
    auto half = ASSERT_OK(control::Client::connect(vm.socket_path()));
    ASSERT_SUCCESS(half.negotiate());
    ASSERT_SUCCESS(half.send_raw("{\"execute\": \"qu"));
  }
  // An overlong line.
  {
    auto big = ASSERT_OK(control::Client::connect(vm.socket_path()));
    ASSERT_SUCCESS(big.negotiate());
    auto reply = big.request_line(std::string(70 * 1024, 'x'));
    if (reply) {
      EXPECT_EQ((*reply)["error"]["class"], "GenericError");
    }
  }

  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
  ASSERT_OK(vm.wait_guest(
      [&](const json& g) { return g["heartbeat"].get<uint64_t>() > before["heartbeat"].get<uint64_t>() + 10; }, 10s));
  auto verified = ASSERT_OK(vm.command("guest-verify"));
  EXPECT_EQ(verified["mismatches"], 0);
}

}  // namespace
}  // namespace vmm::testing

namespace vmm::testing {
namespace {

// After a kexec, `vmm restore --session NAME` retrieves the VM from the
// kernel. Without /dev/liveupdate (as here) it must say so and stop.
TEST(RestoreCommand, WithoutLiveUpdateDeviceGivesOneClearError) {
  if (std::filesystem::exists("/dev/liveupdate")) GTEST_SKIP() << "this host has /dev/liveupdate";
  auto [status, err] = ASSERT_OK(VmmProcess::run_to_exit({"restore", "--session", "vm-1", "--console", "none"}));
  EXPECT_TRUE(status.exited);
  EXPECT_NE(status.code, 0);
  EXPECT_NE(err.find("/dev/liveupdate"), std::string::npos) << err;
  EXPECT_EQ(std::ranges::count(err, '\n'), 1) << err;
}

TEST(RestoreCommand, RequiresASessionName) {
  auto [status, err] = ASSERT_OK(VmmProcess::run_to_exit({"restore"}));
  EXPECT_NE(status.code, 0);
  EXPECT_NE(err.find("--session"), std::string::npos) << err;
}

}  // namespace
}  // namespace vmm::testing

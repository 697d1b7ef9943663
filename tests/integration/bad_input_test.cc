// Bad input on the command line and on the control socket: one clear error,
// a non-zero exit, nothing left behind; the guest keeps running untouched.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "base/unique_fd.h"
#include "tests/integration/vmm_process.h"

namespace vmm::testing {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

// Exit statuses of `vmm run` (docs/architecture.md, "Errors as values").
constexpr int kBadOption = 2;      // refused from the options alone, before anything is built
constexpr int kMachineRefuses = 1;  // refused by the machine or the host while the VM is built

struct BadRun {
  const char* name;
  std::vector<std::string> args;
  const char* expected;  // a phrase the one error line must contain
  int status;            // kBadOption or kMachineRefuses
  bool needs_kvm = false;  // refused only after /dev/kvm is opened
};

void PrintTo(const BadRun& bad, std::ostream* out) { *out << bad.name; }

class BadCommandLine : public ::testing::TestWithParam<BadRun> {};

TEST_P(BadCommandLine, OneClearErrorAndNothingLeftBehind) {
  const BadRun& bad = GetParam();
  if (bad.needs_kvm) REQUIRE_KVM();
  const auto dir = std::filesystem::temp_directory_path() / ("vmm-bad-" + std::to_string(::getpid()));
  // Fresh even when an earlier case failed before it could clean up.
  std::filesystem::remove_all(dir);
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
  EXPECT_EQ(status.code, bad.status) << "stderr: " << err;
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
        BadRun{"ZeroMemory", {"--memory", "0"}, "RAM size is 0", kMachineRefuses},
        BadRun{"UnalignedMemory", {"--memory", "1000"}, "page", kMachineRefuses},
        BadRun{"MemoryNotASize", {"--memory", "lots"}, "not a size", kBadOption},
        BadRun{"MemoryBadSuffix", {"--memory", "12Q"}, "suffix", kBadOption},
        BadRun{"MemoryInScientificNotation", {"--memory", "1e400"}, "unknown suffix 'e400'", kBadOption},
        BadRun{"MemoryBeyond64Bits", {"--memory", "18446744073709551616"}, "too large", kBadOption},
        BadRun{"MemoryBeyond64BitsBySuffix", {"--memory", "16777216T"}, "too large", kBadOption},
        BadRun{"NegativeMemory", {"--memory", "-1G"}, "not a size", kBadOption},
        BadRun{"MemoryLargerThanHost", {"--memory", "8T"}, "the host cannot provide it", kMachineRefuses, true},
        BadRun{"MemoryLargerThanAddressSpace", {"--memory", "64T"}, "address space", kMachineRefuses},
        BadRun{"ZeroVcpus", {"--vcpus", "0"}, "--vcpus", kMachineRefuses},
        BadRun{"TooManyVcpus", {"--vcpus", "999"}, "--vcpus", kMachineRefuses},
        BadRun{"OneVcpuTooMany", {"--vcpus", "33"}, "--vcpus 33 is out of range: use 1 to 32", kMachineRefuses},
        BadRun{"NegativeVcpus", {"--vcpus", "-1"}, "--vcpus '-1' is not a number of vCPUs", kBadOption},
        BadRun{"VcpusBeyond32Bits", {"--vcpus", "4294967297"}, "--vcpus '4294967297' is not a number", kBadOption},
        BadRun{"VcpusNotANumber", {"--vcpus", "two"}, "--vcpus 'two' is not a number", kBadOption},
        BadRun{"VcpusFraction", {"--vcpus", "1.5"}, "--vcpus '1.5' is not a number", kBadOption},
        BadRun{"EmptyVcpus", {"--vcpus", ""}, "--vcpus '' is not a number", kBadOption},
        BadRun{"UnknownBacking", {"--memory-backing", "tmpfs"}, "--memory-backing", kBadOption},
        BadRun{"SharedTooLarge", {"--shared-memory", "1G"}, "shared", kMachineRefuses},
        BadRun{"SharedNotASize", {"--shared-memory", "1e400"}, "--shared-memory '1e400'", kBadOption},
        BadRun{"SharedSmallerThanTheGuestProtocol", {"--shared-memory", "4K"}, "use at least 8 KiB", kMachineRefuses},
        BadRun{"EmptyKernel", {"--kernel", ""}, "--kernel is empty", kBadOption},
        BadRun{"MissingKernel", {"--kernel", "/nonexistent/vmlinux"}, "cannot open kernel", kMachineRefuses},
        BadRun{"KernelNotElf", {"--kernel", "/etc/hostname"}, "not an ELF", kMachineRefuses},
        BadRun{"KernelNotPvh", {"--kernel", "/bin/true"}, "not a PVH kernel", kMachineRefuses},
        BadRun{"KernelIsADirectory", {"--kernel", "/"}, "kernel '/' is a directory, not a regular file",
               kMachineRefuses},
        BadRun{"KernelIsACharacterDevice", {"--kernel", "/dev/zero"}, "is a character device, not a regular file",
               kMachineRefuses},
        BadRun{"CmdlineLongerThanTheBootPage", {"--cmdline", std::string(8000, 'a')},
               "--cmdline is 8000 bytes; the limit is 4095", kMachineRefuses, true},
        BadRun{"EmptyKvmDevice", {"--kvm-device", ""}, "--kvm-device is empty", kBadOption},
        BadRun{"NoKvmDevice", {"--kvm-device", "/nonexistent/kvm"}, "/nonexistent/kvm", kMachineRefuses},
        BadRun{"EmptyControlSocket", {"--control-socket", ""}, "--control-socket is empty", kBadOption},
        BadRun{"ControlSocketLongerThanSunPath", {"--control-socket", "/tmp/" + std::string(103, 's')},
               "is 108 bytes long: a Unix socket path holds at most 107", kBadOption},
        BadRun{"SocketDirectoryMissing", {"--control-socket", "/nonexistent/dir/vmm.sock"}, "control socket directory",
               kMachineRefuses},
        BadRun{"EmptyName", {"--name", ""}, "--name is empty", kBadOption},
        BadRun{"NameWithSlash", {"--name", "vm/0"}, "--name 'vm/0' cannot name a VM", kBadOption},
        BadRun{"NameThatIsAParentDirectory", {"--name", ".."}, "--name '..' cannot name a VM", kBadOption},
        BadRun{"NameWithSpace", {"--name", "vm 0"}, "--name 'vm 0' cannot name a VM", kBadOption},
        BadRun{"NameLongerThanALuoSession", {"--name", std::string(64, 'n')},
               "is 64 bytes long: the name of the VM names its LUO session, which holds at most 63", kBadOption},
        BadRun{"BadLogLevel", {"--log-level", "loud"}, "--log-level", kBadOption},
        BadRun{"EmptyConsole", {"--console", ""}, "--console is empty", kBadOption},
        BadRun{"ConsoleFileInMissingDir", {"--console", "/nonexistent/dir/console.log"}, "console", kMachineRefuses},
        BadRun{"ConsoleIsADirectory", {"--console", "/"}, "console '/' is a directory", kMachineRefuses},
        BadRun{"ConsoleIsANonTerminalDevice", {"--console", "/dev/zero"},
               "console '/dev/zero' is a character device that is neither a terminal nor /dev/null",
               kMachineRefuses}),
    [](const auto& info) { return std::string(info.param.name); });

// A FIFO opens only once its other end does: the vmm must refuse one at
// once instead of waiting for a writer (kernel) or a reader (console) that
// may never come.
class FifoPath : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = (std::filesystem::temp_directory_path() / ("vmm-fifo-" + std::to_string(::getpid()))).string();
    std::filesystem::remove(path_);
    ASSERT_EQ(::mkfifo(path_.c_str(), 0600), 0) << std::strerror(errno);
  }
  void TearDown() override { std::filesystem::remove(path_); }

  // Runs `vmm run ARGS`, which must exit at once with one error line containing `expected`.
  void expect_refused(std::vector<std::string> args, const std::string& expected) {
    args.insert(args.begin(), "run");
    auto [status, err] = ASSERT_OK(VmmProcess::run_to_exit(args, 10s));
    EXPECT_TRUE(status.exited);
    EXPECT_EQ(status.code, kMachineRefuses) << "stderr: " << err;
    EXPECT_NE(err.find(expected), std::string::npos) << "stderr: " << err;
    EXPECT_EQ(std::ranges::count(err, '\n'), 1) << "stderr: " << err;
  }

  std::string path_;
};

TEST_F(FifoPath, KernelIsRefusedWithoutWaitingForAWriter) {
  expect_refused({"--kernel", path_, "--console", "none"}, "kernel '" + path_ + "' is a FIFO, not a regular file");
}

TEST_F(FifoPath, ConsoleWithoutAReaderIsRefusedWithoutWaitingForOne) {
  expect_refused({"--console", path_}, "console '" + path_ + "' is a FIFO");
}

// Even with a reader: one that leaves would kill the vmm (SIGPIPE) and the guest with it.
TEST_F(FifoPath, ConsoleWithAReaderIsRefusedToo) {
  UniqueFd reader(::open(path_.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  ASSERT_TRUE(reader) << std::strerror(errno);
  expect_refused({"--console", path_}, "console '" + path_ + "' is a FIFO");
}

// The limits above refuse only what is out of bounds: a name of exactly the
// LUO limit and /dev/null as the console boot.
TEST(GoodCommandLine, LongestNameAndDevNullConsoleBoot) {
  REQUIRE_KVM();
  auto vm = ASSERT_OK(VmmProcess::launch({"--name", std::string(63, 'n'), "--console", "/dev/null"}));
  ASSERT_OK(vm.wait_guest([](const json& g) { return g["heartbeat"].get<uint64_t>() > 0; }, 10s));
  EXPECT_EQ(ASSERT_OK(vm.command("query-status"))["status"], "running");
}

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

// A KVM device that cannot be opened is found before the session is
// retrieved, so the session stays in the kernel for the next attempt.
TEST(RestoreCommand, AMissingKvmDeviceIsReportedBeforeTheRetrieve) {
  auto [status, err] = ASSERT_OK(VmmProcess::run_to_exit(
      {"restore", "--session", "vm-1", "--console", "none", "--kvm-device", "/nonexistent/kvm"}));
  EXPECT_TRUE(status.exited);
  EXPECT_EQ(status.code, 1);
  EXPECT_NE(err.find("/nonexistent/kvm"), std::string::npos) << err;
  EXPECT_EQ(err.find("/dev/liveupdate"), std::string::npos) << "nothing was asked of LUO: " << err;
  EXPECT_EQ(std::ranges::count(err, '\n'), 1) << err;
}

// So is a control socket that could not be served (its folder is not
// there): after the retrieve the VM would be this process's alone.
TEST(RestoreCommand, AnUnservableControlSocketIsReportedBeforeTheRetrieve) {
  auto [status, err] = ASSERT_OK(VmmProcess::run_to_exit(
      {"restore", "--session", "vm-1", "--console", "none", "--control-socket", "/nonexistent/dir/vm-1.sock"}));
  EXPECT_TRUE(status.exited);
  EXPECT_EQ(status.code, 1);
  EXPECT_NE(err.find("control socket directory /nonexistent/dir does not exist"), std::string::npos) << err;
  EXPECT_NE(err.find("session 'vm-1' is untouched"), std::string::npos) << err;
  EXPECT_EQ(err.find("/dev/liveupdate"), std::string::npos) << "nothing was asked of LUO: " << err;
}

TEST(RestoreCommand, RequiresASessionName) {
  auto [status, err] = ASSERT_OK(VmmProcess::run_to_exit({"restore"}));
  EXPECT_NE(status.code, 0);
  EXPECT_NE(err.find("--session"), std::string::npos) << err;
}

}  // namespace
}  // namespace vmm::testing

// Boots the embedded test guest under QEMU (microvm, KVM) without a shared
// region: one vCPU, self-verification every 500 ticks, exit after 1500
// heartbeats. Skipped when qemu-system-x86_64 or /dev/kvm is unavailable.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "guest/embedded.h"

namespace vmm::guest {
namespace {

std::string find_in_path(std::string_view program) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return {};
  std::string_view directories(path);
  while (!directories.empty()) {
    const auto colon = directories.find(':');
    const std::string candidate =
        std::string(directories.substr(0, colon)) + "/" + std::string(program);
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    if (colon == std::string_view::npos) break;
    directories.remove_prefix(colon + 1);
  }
  return {};
}

bool kvm_usable() {
  const int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  ::close(fd);
  return true;
}

class TemporaryImage {
 public:
  TemporaryImage() {
    char name[] = "/tmp/test-guest-XXXXXX";
    const int fd = ::mkstemp(name);
    if (fd < 0) return;
    ::close(fd);
    path_ = name;
    const auto image = test_guest_image();
    std::ofstream(path_, std::ios::binary)
        .write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(image.size()));
  }
  ~TemporaryImage() {
    if (!path_.empty()) std::filesystem::remove(path_);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<std::string> lines_with(const std::string& text, std::string_view needle) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    if (line.find(needle) != std::string::npos) lines.push_back(std::move(line));
    start = end + 1;
  }
  return lines;
}

TEST(GuestQemu, BootsStampsVerifiesAndExits) {
  const std::string qemu = find_in_path("qemu-system-x86_64");
  if (qemu.empty()) GTEST_SKIP() << "qemu-system-x86_64 is not installed";
  if (!kvm_usable()) GTEST_SKIP() << "/dev/kvm is not usable";
  if (find_in_path("timeout").empty()) GTEST_SKIP() << "timeout(1) is not installed";

  TemporaryImage image;
  ASSERT_FALSE(image.path().empty());
  // -arch-capabilities: this host's KVM refuses QEMU 7.2's write of
  // IA32_ARCH_CAPABILITIES (MSR 0x10a) under -cpu host, and QEMU aborts.
  const std::string command =
      "timeout 20 " + qemu +
      " -M microvm -enable-kvm -cpu host,-arch-capabilities -m 128M -nodefaults -no-reboot -display none"
      " -monitor none -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=1"
      " -kernel " + image.path() +
      " -append 'tick-us=1000 exit-after=1500 verify-every=500' 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char chunk[4096];
  for (size_t n; (n = std::fread(chunk, 1, sizeof chunk, pipe)) > 0;) output.append(chunk, n);
  const int status = ::pclose(pipe);

  // isa-debug-exit turns the guest's 0 into QEMU exit status (0 << 1) | 1.
  ASSERT_TRUE(WIFEXITED(status)) << output;
  EXPECT_EQ(WEXITSTATUS(status), 1) << "(124 = timed out)\n" << output;
  EXPECT_NE(output.find("test-guest: boot: 1 vCPUs"), std::string::npos) << output;
  EXPECT_NE(output.find("test-guest: first heartbeat"), std::string::npos) << output;
  EXPECT_NE(output.find("test-guest: stamping finished"), std::string::npos) << output;
  int verifications = 0;
  for (const std::string& line : lines_with(output, "test-guest: self-verify vcpu 0:")) {
    verifications++;
    EXPECT_NE(line.find(" checked, 0 mismatches"), std::string::npos) << line;
  }
  EXPECT_GE(verifications, 2) << output;
  EXPECT_EQ(output.find("fault"), std::string::npos) << output;
  EXPECT_NE(output.find("test-guest: exit-after 1500 reached"), std::string::npos) << output;
}

}  // namespace
}  // namespace vmm::guest

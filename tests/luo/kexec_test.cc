// The kexec helper behind its seam: no test here can reach the real
// kexec_file_load or reboot; the fakes record what would have been done.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/kexec.h>
#include <linux/reboot.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "luo/kexec.h"
#include "tests/luo/test_util.h"

namespace vmm::luo {
namespace {

struct Recorder {
  struct Load {
    std::string kernel_link;
    int initrd_fd;
    unsigned long cmdline_len;
    std::string cmdline;
    unsigned long flags;
  };
  std::vector<Load> loads;
  std::vector<int> reboots;
  int load_errno = 0;
  int reboot_errno = EIO;  // a real reboot never returns on success
};
Recorder* g_recorder = nullptr;

long fake_kexec_file_load(int kernel_fd, int initrd_fd, unsigned long cmdline_len, const char* cmdline,
                          unsigned long flags) {
  g_recorder->loads.push_back({testing::link_of(kernel_fd), initrd_fd, cmdline_len,
                               cmdline && cmdline_len ? std::string(cmdline, cmdline_len - 1) : std::string(), flags});
  if (g_recorder->load_errno != 0) {
    errno = g_recorder->load_errno;
    return -1;
  }
  return 0;
}

int fake_reboot(int cmd) {
  g_recorder->reboots.push_back(cmd);
  errno = g_recorder->reboot_errno;
  return g_recorder->reboot_errno == 0 ? 0 : -1;
}

class KexecSeam : public ::testing::Test {
 protected:
  void SetUp() override {
    g_recorder = &recorder_;
    char pattern[] = "/tmp/luo-kexec-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
    device_ = dir_ / "liveupdate";
    kernel_ = dir_ / "bzImage";
    initrd_ = dir_ / "initrd.img";
    std::ofstream(device_) << "";
    std::ofstream(kernel_) << "not really a kernel";
    std::ofstream(initrd_) << "not really an initrd";
  }
  void TearDown() override {
    g_recorder = nullptr;
    std::filesystem::remove_all(dir_);
  }
  Kexec make() { return Kexec(KexecSyscalls{&fake_kexec_file_load, &fake_reboot}, device_.string()); }
  KexecImage image() const { return KexecImage{kernel_.string(), std::nullopt, "console=ttyS0 kho=on liveupdate=on"}; }

  Recorder recorder_;
  std::filesystem::path dir_, device_, kernel_, initrd_;
};

TEST_F(KexecSeam, LoadPassesImageCmdlineAndNoInitramfsFlag) {
  auto kexec = make();
  ASSERT_TRUE(kexec.load(image()));
  ASSERT_EQ(recorder_.loads.size(), 1u);
  const auto& load = recorder_.loads[0];
  EXPECT_EQ(load.kernel_link, kernel_.string());
  EXPECT_EQ(load.initrd_fd, -1);
  EXPECT_EQ(load.cmdline, "console=ttyS0 kho=on liveupdate=on");
  EXPECT_EQ(load.cmdline_len, load.cmdline.size() + 1) << "the length counts the NUL";
  EXPECT_EQ(load.flags, static_cast<unsigned long>(KEXEC_FILE_NO_INITRAMFS));
  EXPECT_TRUE(kexec.loaded());
  EXPECT_TRUE(recorder_.reboots.empty());
}

TEST_F(KexecSeam, LoadWithInitrd) {
  auto kexec = make();
  auto img = image();
  img.initrd_path = initrd_.string();
  ASSERT_TRUE(kexec.load(img));
  ASSERT_EQ(recorder_.loads.size(), 1u);
  EXPECT_GE(recorder_.loads[0].initrd_fd, 0);
  EXPECT_EQ(recorder_.loads[0].flags, 0u);
}

TEST_F(KexecSeam, LoadFromOpenFiles) {
  auto kexec = make();
  UniqueFd kernel(::open(kernel_.c_str(), O_RDONLY | O_CLOEXEC));
  UniqueFd initrd(::open(initrd_.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(kexec.load(kernel.ref(), initrd.ref(), "kho=on liveupdate=on"));
  ASSERT_EQ(recorder_.loads.size(), 1u);
  EXPECT_EQ(recorder_.loads[0].kernel_link, kernel_.string());
  EXPECT_EQ(recorder_.loads[0].initrd_fd, initrd.get());
  EXPECT_EQ(recorder_.loads[0].flags, 0u);
  EXPECT_TRUE(kexec.loaded());
}

TEST_F(KexecSeam, MissingKernelImageIsENOENTWithoutSyscall) {
  auto kexec = make();
  auto img = image();
  img.kernel_path = (dir_ / "no-such-bzImage").string();
  auto loaded = kexec.load(img);
  ASSERT_FALSE(loaded);
  EXPECT_EQ(loaded.error().code, ENOENT);
  EXPECT_NE(loaded.error().message.find("kernel image"), std::string::npos) << loaded.error().message;
  EXPECT_NE(loaded.error().message.find("not found"), std::string::npos);
  EXPECT_TRUE(recorder_.loads.empty());
}

TEST_F(KexecSeam, MissingInitrdIsENOENT) {
  auto kexec = make();
  auto img = image();
  img.initrd_path = (dir_ / "no-initrd").string();
  auto loaded = kexec.load(img);
  ASSERT_FALSE(loaded);
  EXPECT_EQ(loaded.error().code, ENOENT);
  EXPECT_NE(loaded.error().message.find("initrd"), std::string::npos);
  EXPECT_TRUE(recorder_.loads.empty());
}

TEST_F(KexecSeam, NoLiveUpdateDeviceRefusesToKexec) {
  Kexec kexec(KexecSyscalls{&fake_kexec_file_load, &fake_reboot}, (dir_ / "absent").string());
  auto loaded = kexec.load(image());
  ASSERT_FALSE(loaded);
  EXPECT_EQ(loaded.error().code, ENOENT);
  EXPECT_NE(loaded.error().message.find("CONFIG_LIVEUPDATE"), std::string::npos) << loaded.error().message;
  EXPECT_NE(loaded.error().message.find("use --mode exec"), std::string::npos);
  EXPECT_TRUE(recorder_.loads.empty());
}

TEST_F(KexecSeam, CmdlineWithoutLiveUpdateIsRefused) {
  auto kexec = make();
  auto img = image();
  img.cmdline = "console=ttyS0";
  auto loaded = kexec.load(img);
  ASSERT_FALSE(loaded);
  EXPECT_EQ(loaded.error().code, EINVAL);
  EXPECT_NE(loaded.error().message.find("kho=on liveupdate=on"), std::string::npos);
  EXPECT_TRUE(recorder_.loads.empty());
}

TEST_F(KexecSeam, KernelErrorsAreExplained) {
  const std::vector<std::pair<int, std::string>> cases = {
      {EPERM, "CAP_SYS_BOOT"},
      {ENOSYS, "CONFIG_KEXEC_FILE"},
      {ENOEXEC, "not a kernel image"},
      {EKEYREJECTED, "signature"},
  };
  for (const auto& [code, words] : cases) {
    auto kexec = make();
    recorder_.load_errno = code;
    auto loaded = kexec.load(image());
    ASSERT_FALSE(loaded);
    EXPECT_EQ(loaded.error().code, code);
    EXPECT_NE(loaded.error().message.find(words), std::string::npos) << loaded.error().message;
    EXPECT_FALSE(kexec.loaded());
  }
}

TEST_F(KexecSeam, RebootNeedsALoadedImage) {
  auto kexec = make();
  auto rebooted = kexec.reboot();
  ASSERT_FALSE(rebooted);
  EXPECT_EQ(rebooted.error().code, EINVAL);
  EXPECT_TRUE(recorder_.reboots.empty());
}

TEST_F(KexecSeam, RebootAsksForKexecAndExplainsAFailedFreeze) {
  auto kexec = make();
  ASSERT_TRUE(kexec.load(image()));
  recorder_.reboot_errno = ENOENT;  // e.g. a guest_memfd's freeze found no VM in its session
  auto rebooted = kexec.reboot();
  ASSERT_EQ(recorder_.reboots.size(), 1u);
  EXPECT_EQ(recorder_.reboots[0], static_cast<int>(LINUX_REBOOT_CMD_KEXEC));
  ASSERT_FALSE(rebooted);
  EXPECT_EQ(rebooted.error().code, ENOENT);
  EXPECT_NE(rebooted.error().message.find("freeze"), std::string::npos);

  recorder_.reboot_errno = EPERM;
  rebooted = kexec.reboot();
  ASSERT_FALSE(rebooted);
  EXPECT_NE(rebooted.error().message.find("CAP_SYS_BOOT"), std::string::npos);
}

TEST_F(KexecSeam, CurrentCmdlineReadsProcCmdline) {
  std::ofstream(dir_ / "cmdline") << "root=/dev/vda kho=on liveupdate=on\n";
  auto cmdline = Kexec::current_cmdline((dir_ / "cmdline").string());
  ASSERT_TRUE(cmdline);
  EXPECT_EQ(*cmdline, "root=/dev/vda kho=on liveupdate=on");
  EXPECT_FALSE(Kexec::current_cmdline((dir_ / "none").string()));
}

TEST(KernelBooleanParam, ReadsValuesAsTheKernelDoes) {
  EXPECT_EQ(kernel_boolean_param("kho=on liveupdate=on", "kho"), true);
  EXPECT_EQ(kernel_boolean_param("kho=1", "kho"), true);
  EXPECT_EQ(kernel_boolean_param("kho=y", "kho"), true);
  EXPECT_EQ(kernel_boolean_param("kho=Y", "kho"), true);
  EXPECT_EQ(kernel_boolean_param("kho=\"on\"", "kho"), true);
  EXPECT_EQ(kernel_boolean_param("kho=off", "kho"), false);
  EXPECT_EQ(kernel_boolean_param("kho=0", "kho"), false);
  EXPECT_EQ(kernel_boolean_param("kho=n", "kho"), false);
  // The last occurrence wins, as every early_param sees each one in turn.
  EXPECT_EQ(kernel_boolean_param("kho=on quiet kho=off", "kho"), false);
  EXPECT_EQ(kernel_boolean_param("kho=off kho=1", "kho"), true);
  // Other parameters that merely contain the name, a bare name, bad values.
  EXPECT_EQ(kernel_boolean_param("nokho=on xkho=1 kho_scratch=on", "kho"), std::nullopt);
  EXPECT_EQ(kernel_boolean_param("kho", "kho"), std::nullopt);
  EXPECT_EQ(kernel_boolean_param("kho=maybe kho=", "kho"), std::nullopt);
  EXPECT_EQ(kernel_boolean_param("", "kho"), std::nullopt);
  // A quoted value with a space is one parameter; after "--" come init's arguments.
  EXPECT_EQ(kernel_boolean_param("foo=\"a kho=on\" kho=off", "kho"), false);
  EXPECT_EQ(kernel_boolean_param("kho=off -- kho=on", "kho"), false);
}

TEST_F(KexecSeam, CmdlineParsedAsTheKernelDoes) {
  for (const char* cmdline : {"kho=1 liveupdate=y", "kho=off liveupdate=on kho=on"}) {
    auto kexec = make();
    auto img = image();
    img.cmdline = cmdline;
    EXPECT_TRUE(kexec.load(img)) << cmdline;
  }
  for (const char* cmdline : {"nokho=on liveupdate=on", "kho=on liveupdate=on liveupdate=off", "kho=on liveupdate"}) {
    auto kexec = make();
    auto img = image();
    img.cmdline = cmdline;
    auto loaded = kexec.load(img);
    ASSERT_FALSE(loaded) << cmdline;
    EXPECT_EQ(loaded.error().code, EINVAL);
    EXPECT_FALSE(kexec.loaded());
  }
}

TEST_F(KexecSeam, UnloadAndTheDestructorUnstageTheImage) {
  {
    auto kexec = make();
    ASSERT_TRUE(kexec.unload());  // nothing loaded: no system call
    EXPECT_TRUE(recorder_.loads.empty());
    ASSERT_TRUE(kexec.load(image()));
    ASSERT_TRUE(kexec.unload());
    EXPECT_FALSE(kexec.loaded());
    ASSERT_EQ(recorder_.loads.size(), 2u);
    EXPECT_EQ(recorder_.loads[1].flags, static_cast<unsigned long>(KEXEC_FILE_UNLOAD));
    EXPECT_EQ(recorder_.loads[1].cmdline_len, 0u);
    ASSERT_TRUE(kexec.load(image()));
  }
  // The second image was still loaded when the object went: it is unloaded.
  ASSERT_EQ(recorder_.loads.size(), 4u);
  EXPECT_EQ(recorder_.loads[3].flags, static_cast<unsigned long>(KEXEC_FILE_UNLOAD));
}

}  // namespace
}  // namespace vmm::luo

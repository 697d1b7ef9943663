#include "luo/kexec.h"

#include <fcntl.h>
#include <linux/kexec.h>
#include <linux/reboot.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fstream>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace vmm::luo {

namespace {

long real_kexec_file_load(int kernel_fd, int initrd_fd, unsigned long cmdline_len, const char* cmdline,
                          unsigned long flags) {
  return ::syscall(SYS_kexec_file_load, kernel_fd, initrd_fd, cmdline_len, cmdline, flags);
}

int real_reboot(int cmd) { return ::reboot(cmd); }

Result<UniqueFd> open_image(const std::string& path, const char* what, const char* fix) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      return std::unexpected(Error{ENOENT, fmt::format("{} '{}' not found: {}", what, path, fix)});
    }
    return fail_errno(fmt::format("cannot open {} '{}'", what, path));
  }
  return UniqueFd(fd);
}

Error kexec_load_error(int code) {
  switch (code) {
    case EPERM:
      return Error{code, "kexec_file_load refused: it needs CAP_SYS_BOOT in the initial user namespace, "
                         "and kexec may be disabled (sysctl kernel.kexec_load_disabled=1) or blocked by "
                         "lockdown; run as root on the host"};
    case ENOSYS:
      return Error{code, "kexec_file_load is not available: the kernel was built without CONFIG_KEXEC_FILE"};
    case ENOEXEC:
      return Error{code, "not a kernel image this kernel can kexec (a bzImage for this architecture "
                         "is needed)"};
    case EKEYREJECTED:
    case EBADMSG:
    case ENOKEY:
      return Error{code, "the kernel image's signature was rejected (KEXEC_SIG / lockdown): sign it "
                         "with a trusted key"};
    case EBUSY:
      return Error{code, "another kexec image is being loaded: retry once it is done"};
    case EINVAL:
      return Error{code, "kexec_file_load rejected its arguments (command line too long for "
                         "COMMAND_LINE_SIZE, or bad flags)"};
    case ENOMEM:
      return Error{code, "not enough memory to stage the kexec image"};
    default:
      return Error{code, "kexec_file_load"};
  }
}

}  // namespace

KexecSyscalls real_kexec_syscalls() { return KexecSyscalls{&real_kexec_file_load, &real_reboot}; }

Result<std::string> Kexec::current_cmdline(const std::string& path) {
  std::ifstream in(path);
  if (!in) return fail(fmt::format("cannot read the kernel command line from {}", path), ENOENT);
  std::string line;
  std::getline(in, line);
  while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
  return line;
}

Result<void> Kexec::load(const KexecImage& image) {
  loaded_ = false;
  VMM_TRY(check_prerequisites(image.cmdline));
  VMM_TRY_ASSIGN(kernel, open_image(image.kernel_path, "kernel image",
                                    "give the path of the new kernel's bzImage"));
  UniqueFd initrd;
  if (image.initrd_path) {
    VMM_TRY_ASSIGN(opened, open_image(*image.initrd_path, "initrd", "give an existing initrd or none"));
    initrd = std::move(opened);
  }
  auto loaded = load(kernel.ref(), initrd.ref(), image.cmdline);
  if (!loaded) return std::unexpected(loaded.error().with_context(image.kernel_path));
  spdlog::info("luo: loaded kexec image {} (initrd {}, cmdline '{}')", image.kernel_path,
               image.initrd_path.value_or("none"), image.cmdline);
  return {};
}

Result<void> Kexec::load(FdRef kernel, FdRef initrd, const std::string& cmdline) {
  loaded_ = false;
  VMM_TRY(check_prerequisites(cmdline));
  const unsigned long flags = initrd.valid() ? 0 : KEXEC_FILE_NO_INITRAMFS;
  // The length counts the terminating NUL; the kernel checks it is there.
  if (syscalls_.kexec_file_load(kernel.get(), initrd.valid() ? initrd.get() : -1, cmdline.size() + 1,
                                cmdline.c_str(), flags) != 0) {
    return std::unexpected(kexec_load_error(errno));
  }
  loaded_ = true;
  return {};
}

Result<void> Kexec::check_prerequisites(const std::string& cmdline) const {
  struct stat st {};
  if (::stat(liveupdate_device_.c_str(), &st) != 0) {
    return fail(fmt::format("{} not found: this kernel lacks CONFIG_LIVEUPDATE or was booted without "
                            "'kho=on liveupdate=on'; a kexec now would lose the guest; use --mode exec",
                            liveupdate_device_),
                ENOENT);
  }
  if (cmdline.find("liveupdate=on") == std::string::npos || cmdline.find("kho=on") == std::string::npos) {
    return fail(fmt::format("the new kernel's command line '{}' lacks 'kho=on liveupdate=on': the new "
                            "kernel could not receive the preserved sessions",
                            cmdline),
                EINVAL);
  }
  return {};
}

Result<void> Kexec::reboot() {
  if (!loaded_) return fail("no kexec image loaded: call Kexec::load() first", EINVAL);
  spdlog::info("luo: rebooting into the new kernel (LUO freezes the preserved files now)");
  if (syscalls_.reboot(LINUX_REBOOT_CMD_KEXEC) == 0) return {};  // only a fake gets here
  const int code = errno;
  switch (code) {
    case EPERM:
      return fail("reboot(LINUX_REBOOT_CMD_KEXEC) refused: it needs CAP_SYS_BOOT", code);
    case EINVAL:
      return fail("reboot(LINUX_REBOOT_CMD_KEXEC) failed: no kexec image is loaded in the kernel", code);
    default:
      return std::unexpected(Error{
          code, "the kexec reboot was aborted, most likely because a LUO file's freeze failed (see "
                "dmesg: a guest_memfd whose VM is not in the same session fails with ENOENT); the "
                "kernel unfroze every session: resume the VM, or fix and retry"});
  }
}

}  // namespace vmm::luo

// The kexec half of a host-kernel live update: load the new kernel with
// kexec_file_load(2), then reboot(LINUX_REBOOT_CMD_KEXEC), during which LUO
// freezes every preserved file (a freeze failure aborts the reboot and the
// system keeps running). Equivalent to `kexec -l -s KERNEL ...; kexec -e`.
//
// Both system calls go through an injectable seam so tests record calls
// instead of making them. Nothing here runs unless the VMM is asked for a
// kernel live update, and load() refuses to proceed without /dev/liveupdate:
// a kexec without LUO would throw the guest away.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm::luo {

struct KexecSyscalls {
  // kexec_file_load(2); -1 with errno on failure.
  long (*kexec_file_load)(int kernel_fd, int initrd_fd, unsigned long cmdline_len,
                          const char* cmdline, unsigned long flags);
  // reboot(2) with the glibc calling convention (magic numbers supplied);
  // returns only on failure.
  int (*reboot)(int cmd);
};
[[nodiscard]] KexecSyscalls real_kexec_syscalls();

struct KexecImage {
  std::string kernel_path;                 // the new kernel's bzImage
  std::optional<std::string> initrd_path;  // none: KEXEC_FILE_NO_INITRAMFS
  std::string cmdline;                     // must keep "kho=on liveupdate=on"
};

class Kexec {
 public:
  explicit Kexec(KexecSyscalls syscalls = real_kexec_syscalls(),
                 std::string liveupdate_device = "/dev/liveupdate")
      : syscalls_(syscalls), liveupdate_device_(std::move(liveupdate_device)) {}

  // The running kernel's command line (/proc/cmdline), like kexec --reuse-cmdline.
  [[nodiscard]] static Result<std::string> current_cmdline(const std::string& path = "/proc/cmdline");

  // Opens the image files and loads them. Errors name the cause: a missing
  // kernel image or initrd, no /dev/liveupdate, a command line without
  // "liveupdate=on", EPERM (CAP_SYS_BOOT, kexec_load_disabled, lockdown),
  // ENOEXEC (not a kernel for this machine), signature rejection.
  [[nodiscard]] Result<void> load(const KexecImage& image);
  // The same from open files; an invalid `initrd` means none.
  [[nodiscard]] Result<void> load(FdRef kernel, FdRef initrd, const std::string& cmdline);

  // reboot(LINUX_REBOOT_CMD_KEXEC). Refuses unless load() succeeded. Returns
  // only on failure, e.g. when a LUO file's freeze failed: the kernel has then
  // unfrozen everything and the VM can resume.
  [[nodiscard]] Result<void> reboot();

  [[nodiscard]] bool loaded() const { return loaded_; }

 private:
  [[nodiscard]] Result<void> check_prerequisites(const std::string& cmdline) const;
  KexecSyscalls syscalls_;
  std::string liveupdate_device_;
  bool loaded_ = false;
};

}  // namespace vmm::luo

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
#include <string_view>
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

// A boolean kernel parameter as the kernel reads it (early_param and
// kstrtobool): the last "name=value" wins; y/Y/1/on (and t/T) are true,
// n/N/0/off (and f/F) false; a bare "name" or another value leaves the
// default (nullopt). "kho=on", "kho=1" and "kho=y" all enable KHO;
// "nokho=on" and "xkho=on" are other parameters.
[[nodiscard]] std::optional<bool> kernel_boolean_param(std::string_view cmdline, std::string_view name);

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
  Kexec(const Kexec&) = delete;
  Kexec& operator=(const Kexec&) = delete;
  // An image this object loaded and never rebooted into is unloaded: a
  // cancelled update must not leave a kernel staged for the next reboot.
  ~Kexec();

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

  // kexec_file_load(KEXEC_FILE_UNLOAD): /sys/kernel/kexec_loaded reads 0
  // again. A no-op when nothing was loaded here.
  [[nodiscard]] Result<void> unload();
  [[nodiscard]] bool loaded() const { return loaded_; }

 private:
  [[nodiscard]] Result<void> check_prerequisites(const std::string& cmdline) const;
  KexecSyscalls syscalls_;
  std::string liveupdate_device_;
  bool loaded_ = false;
};

}  // namespace vmm::luo

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

std::optional<bool> kernel_boolean_param(std::string_view cmdline, std::string_view name) {
  std::optional<bool> value;
  size_t at = 0;
  while (at < cmdline.size()) {
    while (at < cmdline.size() && cmdline[at] == ' ') ++at;
    // A parameter ends at a space outside double quotes (the kernel's next_arg).
    size_t end = at;
    bool quoted = false;
    while (end < cmdline.size() && (quoted || cmdline[end] != ' ')) {
      if (cmdline[end] == '"') quoted = !quoted;
      ++end;
    }
    std::string_view word = cmdline.substr(at, end - at);
    at = end;
    if (word == "--") break;  // the rest goes to init
    if (!word.starts_with(name) || word.size() <= name.size() || word[name.size()] != '=') continue;
    std::string_view text = word.substr(name.size() + 1);
    if (text.size() >= 2 && text.front() == '"' && text.back() == '"') text = text.substr(1, text.size() - 2);
    // kstrtobool: the first character decides, except for "on"/"off".
    if (text.empty()) continue;
    switch (text[0]) {
      case 'y': case 'Y': case 't': case 'T': case '1': value = true; break;
      case 'n': case 'N': case 'f': case 'F': case '0': value = false; break;
      case 'o': case 'O':
        if (text.size() >= 2 && (text[1] == 'n' || text[1] == 'N')) value = true;
        else if (text.size() >= 2 && (text[1] == 'f' || text[1] == 'F')) value = false;
        break;
      default: break;
    }
  }
  return value;
}

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
  for (const char* param : {"kho", "liveupdate"}) {
    if (kernel_boolean_param(cmdline, param).value_or(false)) continue;
    return fail(fmt::format("the new kernel's command line '{}' does not turn on {} ('{}=on' is missing or "
                            "overridden): give it 'kho=on liveupdate=on', or the new kernel could not receive "
                            "the preserved sessions",
                            cmdline, param, param),
                EINVAL);
  }
  return {};
}

Kexec::~Kexec() {
  if (!loaded_) return;
  if (auto unloaded = unload(); !unloaded) spdlog::warn("luo: {}", unloaded.error().describe());
}

Result<void> Kexec::unload() {
  if (!loaded_) return {};
  if (syscalls_.kexec_file_load(-1, -1, 0, nullptr, KEXEC_FILE_UNLOAD) != 0)
    return fail_errno("cannot unload the staged kexec image (kexec_file_load with KEXEC_FILE_UNLOAD); "
                      "run 'kexec -u' before the next reboot");
  loaded_ = false;
  spdlog::info("luo: unloaded the kexec image");
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

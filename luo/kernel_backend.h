// LUO through the kernel: /dev/liveupdate and its session fds, across a kexec
// of the host kernel (REFERENCE.md section 1). Needs CONFIG_LIVEUPDATE,
// CONFIG_KEXEC_HANDOVER and a command line with "kho=on liveupdate=on".
//
// The device is exclusive (a second open fails with EBUSY) and an outgoing
// session lives exactly as long as its fd: the KernelBackend and every
// outgoing Session must stay alive until reboot(LINUX_REBOOT_CMD_KEXEC)
// (luo/kexec.h), or the kernel unpreserves their files.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"
#include "luo/session.h"
#include "luo/uapi.h"

namespace vmm::luo {

inline constexpr const char* kLiveUpdateDevice = "/dev/liveupdate";

// The two system calls the kernel backend makes, injectable so the ABI tests
// can stand a fake kernel behind them. Both return -1 and set errno on failure.
struct KernelSyscalls {
  int (*open)(const char* path, int flags);
  int (*ioctl)(int fd, unsigned long request, void* arg);
};
[[nodiscard]] KernelSyscalls real_kernel_syscalls();

// Thin wrappers, one per ioctl, as in the kernel selftests: they fill `size`
// and return the raw result (0, or -1 with errno).
namespace ioctls {
int create_session(const KernelSyscalls& sys, int luo_fd, std::string_view name, int* session_fd);
int retrieve_session(const KernelSyscalls& sys, int luo_fd, std::string_view name, int* session_fd);
int preserve_fd(const KernelSyscalls& sys, int session_fd, int fd, uint64_t token);
int retrieve_fd(const KernelSyscalls& sys, int session_fd, uint64_t token, int* fd);
int finish(const KernelSyscalls& sys, int session_fd);
int get_name(const KernelSyscalls& sys, int session_fd, std::string* name);
}  // namespace ioctls

class KernelBackend final : public Backend {
 public:
  // Opens the device (deserializing the incoming sessions on the first open
  // after a kexec). The error says what to do when it is absent or busy.
  [[nodiscard]] static Result<std::unique_ptr<KernelBackend>> open(
      const std::string& path = kLiveUpdateDevice, KernelSyscalls syscalls = real_kernel_syscalls());

  [[nodiscard]] std::string_view kind() const override { return "kernel"; }
  [[nodiscard]] Result<std::unique_ptr<Session>> create_session(std::string_view name) override;
  [[nodiscard]] Result<std::unique_ptr<Session>> retrieve_session(std::string_view name) override;

  [[nodiscard]] FdRef device_fd() const { return device_.ref(); }

 private:
  KernelBackend(UniqueFd device, KernelSyscalls syscalls)
      : device_(std::move(device)), syscalls_(syscalls) {}
  UniqueFd device_;
  KernelSyscalls syscalls_;
};

class KernelSession final : public Session {
 public:
  KernelSession(UniqueFd fd, std::string name, bool incoming, KernelSyscalls syscalls)
      : fd_(std::move(fd)), name_(std::move(name)), incoming_(incoming), syscalls_(syscalls) {}

  [[nodiscard]] const std::string& name() const override { return name_; }
  [[nodiscard]] bool incoming() const override { return incoming_; }
  [[nodiscard]] Result<void> preserve(FdRef fd, uint64_t token) override;
  [[nodiscard]] Result<UniqueFd> retrieve(uint64_t token) override;
  [[nodiscard]] Result<void> finish() override;

  // LIVEUPDATE_SESSION_GET_NAME (Linux 7.2); EINVAL on older kernels.
  [[nodiscard]] Result<std::string> kernel_name() const;
  [[nodiscard]] FdRef fd() const { return fd_.ref(); }

 private:
  UniqueFd fd_;
  std::string name_;
  bool incoming_;
  KernelSyscalls syscalls_;
};

}  // namespace vmm::luo

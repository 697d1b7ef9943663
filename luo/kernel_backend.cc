#include "luo/kernel_backend.h"

#include <fcntl.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <cstring>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "luo/file_kind.h"

namespace vmm::luo {

namespace {

int real_open(const char* path, int flags) { return ::open(path, flags); }
int real_ioctl(int fd, unsigned long request, void* arg) { return ::ioctl(fd, request, arg); }

// The caller validated the name: it fits with its NUL.
void copy_name(uint8_t (&out)[uapi::kSessionNameLength], std::string_view name) {
  std::memset(out, 0, sizeof(out));
  std::memcpy(out, name.data(), std::min(name.size(), sizeof(out) - 1));
}

Error errno_error(int code, std::string message) { return Error{code, std::move(message)}; }

}  // namespace

KernelSyscalls real_kernel_syscalls() { return KernelSyscalls{&real_open, &real_ioctl}; }

namespace ioctls {

int create_session(const KernelSyscalls& sys, int luo_fd, std::string_view name, int* session_fd) {
  uapi::CreateSession arg{};
  arg.size = sizeof(arg);
  copy_name(arg.name, name);
  if (sys.ioctl(luo_fd, uapi::kIoctlCreateSession, &arg) != 0) return -1;
  *session_fd = arg.fd;
  return 0;
}

int retrieve_session(const KernelSyscalls& sys, int luo_fd, std::string_view name, int* session_fd) {
  uapi::RetrieveSession arg{};
  arg.size = sizeof(arg);
  copy_name(arg.name, name);
  if (sys.ioctl(luo_fd, uapi::kIoctlRetrieveSession, &arg) != 0) return -1;
  *session_fd = arg.fd;
  return 0;
}

int preserve_fd(const KernelSyscalls& sys, int session_fd, int fd, uint64_t token) {
  uapi::SessionPreserveFd arg{};
  arg.size = sizeof(arg);
  arg.fd = fd;
  arg.token = token;
  return sys.ioctl(session_fd, uapi::kIoctlSessionPreserveFd, &arg);
}

int retrieve_fd(const KernelSyscalls& sys, int session_fd, uint64_t token, int* fd) {
  uapi::SessionRetrieveFd arg{};
  arg.size = sizeof(arg);
  arg.fd = -1;
  arg.token = token;
  if (sys.ioctl(session_fd, uapi::kIoctlSessionRetrieveFd, &arg) != 0) return -1;
  *fd = arg.fd;
  return 0;
}

int finish(const KernelSyscalls& sys, int session_fd) {
  uapi::SessionFinish arg{};
  arg.size = sizeof(arg);
  return sys.ioctl(session_fd, uapi::kIoctlSessionFinish, &arg);
}

int get_name(const KernelSyscalls& sys, int session_fd, std::string* name) {
  uapi::SessionGetName arg{};
  arg.size = sizeof(arg);
  if (sys.ioctl(session_fd, uapi::kIoctlSessionGetName, &arg) != 0) return -1;
  const auto* begin = reinterpret_cast<const char*>(arg.name);
  *name = std::string(begin, strnlen(begin, sizeof(arg.name)));
  return 0;
}

}  // namespace ioctls

Result<std::unique_ptr<KernelBackend>> KernelBackend::open(const std::string& path,
                                                           KernelSyscalls syscalls) {
  const int fd = syscalls.open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    const int code = errno;
    switch (code) {
      case ENOENT:
        return std::unexpected(errno_error(
            code, fmt::format("{} not found: this kernel lacks CONFIG_LIVEUPDATE or was booted without "
                              "'kho=on liveupdate=on'; use --mode exec",
                              path)));
      case EBUSY:
        return std::unexpected(errno_error(
            code, fmt::format("{} is already open: the device is exclusive and another agent (luod, "
                              "systemd's LUOSession=, another vmm) holds it; stop it or get a session "
                              "fd from it",
                              path)));
      case EACCES:
      case EPERM:
        return std::unexpected(
            errno_error(code, fmt::format("cannot open {}: permission denied; run the vmm as root", path)));
      default:
        return std::unexpected(errno_error(code, fmt::format("cannot open {}", path)));
    }
  }
  spdlog::debug("luo: opened {} (fd {})", path, fd);
  return std::unique_ptr<KernelBackend>(new KernelBackend(UniqueFd(fd), syscalls));
}

Result<std::unique_ptr<Session>> KernelBackend::create_session(std::string_view name) {
  VMM_TRY(validate_session_name(name));
  int session_fd = -1;
  if (ioctls::create_session(syscalls_, device_.get(), name, &session_fd) != 0) {
    const int code = errno;
    if (code == EEXIST) {
      return std::unexpected(errno_error(
          code, fmt::format("LUO session '{}' already exists: pick another name, or close the old "
                            "session first",
                            name)));
    }
    if (code == ENOMEM) {
      return std::unexpected(errno_error(
          code, fmt::format("cannot create LUO session '{}': the kernel's session table is full", name)));
    }
    return std::unexpected(errno_error(code, fmt::format("LIVEUPDATE_IOCTL_CREATE_SESSION '{}'", name)));
  }
  spdlog::debug("luo: created kernel session '{}' (fd {})", name, session_fd);
  return std::make_unique<KernelSession>(UniqueFd(session_fd), std::string(name), false, syscalls_);
}

Result<std::unique_ptr<Session>> KernelBackend::retrieve_session(std::string_view name) {
  VMM_TRY(validate_session_name(name));
  int session_fd = -1;
  if (ioctls::retrieve_session(syscalls_, device_.get(), name, &session_fd) != 0) {
    const int code = errno;
    if (code == ENOENT) {
      return std::unexpected(errno_error(
          code, fmt::format("no LUO session '{}' was handed over by the previous kernel: it was not "
                            "preserved, or this boot was not a live update",
                            name)));
    }
    if (code == EINVAL) {
      return std::unexpected(errno_error(
          code, fmt::format("LUO session '{}' was already retrieved: use the session fd you got the "
                            "first time",
                            name)));
    }
    return std::unexpected(errno_error(code, fmt::format("LIVEUPDATE_IOCTL_RETRIEVE_SESSION '{}'", name)));
  }
  spdlog::debug("luo: retrieved kernel session '{}' (fd {})", name, session_fd);
  return std::make_unique<KernelSession>(UniqueFd(session_fd), std::string(name), true, syscalls_);
}

Result<void> KernelSession::preserve(FdRef fd, uint64_t token) {
  if (ioctls::preserve_fd(syscalls_, fd_.get(), fd.get(), token) == 0) {
    spdlog::debug("luo: session '{}' preserved fd {} ({}) as token {:#x}", name_, fd.get(),
                  fd_link(fd.get()), token);
    return {};
  }
  const int code = errno;
  switch (code) {
    case EEXIST:
      return std::unexpected(errno_error(
          code, fmt::format("token {:#x} is already used in LUO session '{}': tokens must be unique "
                            "within a session",
                            token, name_)));
    case EBADF:
      return std::unexpected(
          errno_error(code, fmt::format("fd {} is not an open file descriptor", fd.get())));
    case ENOSPC:
      return std::unexpected(errno_error(
          code, fmt::format("LUO session '{}' is full: spread the files over more sessions", name_)));
    case ENOENT:
    case EOPNOTSUPP: {
      auto info = inspect_fd(fd);
      std::string what = info ? info->link : fd_link(fd.get());
      return std::unexpected(errno_error(
          code, fmt::format("no LUO handler for this kind of file: fd {} ({}); this kernel preserves "
                            "memfds (CONFIG_LIVEUPDATE_MEMFD) and, with the guest_memfd series, "
                            "guest_memfds and KVM VMs (CONFIG_LIVEUPDATE_GUEST_MEMFD)",
                            fd.get(), what)));
    }
    default:
      return std::unexpected(errno_error(
          code, fmt::format("LIVEUPDATE_SESSION_PRESERVE_FD fd {} ({}) token {:#x} in session '{}'",
                            fd.get(), fd_link(fd.get()), token, name_)));
  }
}

Result<UniqueFd> KernelSession::retrieve(uint64_t token) {
  int fd = -1;
  if (ioctls::retrieve_fd(syscalls_, fd_.get(), token, &fd) == 0) {
    spdlog::debug("luo: session '{}' retrieved token {:#x} as fd {}", name_, token, fd);
    return UniqueFd(fd);
  }
  const int code = errno;
  switch (code) {
    case ENOENT:
      return std::unexpected(errno_error(
          code, fmt::format("no file with token {:#x} in LUO session '{}'", token, name_)));
    case EAGAIN:
      return std::unexpected(errno_error(
          code, fmt::format("token {:#x} in LUO session '{}' is a guest_memfd whose VM was not "
                            "retrieved yet: retrieve the VM's token first",
                            token, name_)));
    default:
      return std::unexpected(errno_error(
          code, fmt::format("LIVEUPDATE_SESSION_RETRIEVE_FD token {:#x} in session '{}'", token, name_)));
  }
}

Result<void> KernelSession::finish() {
  if (ioctls::finish(syscalls_, fd_.get()) == 0) return {};
  const int code = errno;
  if (code == EBUSY) {
    return std::unexpected(errno_error(
        code, fmt::format("LUO session '{}' can't finish yet: a file is not ready (a guest_memfd "
                          "retrieved without its VM?); retrieve what is missing and finish again",
                          name_)));
  }
  return std::unexpected(errno_error(code, fmt::format("LIVEUPDATE_SESSION_FINISH '{}'", name_)));
}

Result<std::string> KernelSession::kernel_name() const {
  std::string name;
  if (ioctls::get_name(syscalls_, fd_.get(), &name) != 0) {
    return fail_errno(fmt::format("LIVEUPDATE_SESSION_GET_NAME on session '{}' (needs Linux 7.2)", name_));
  }
  return name;
}

}  // namespace vmm::luo

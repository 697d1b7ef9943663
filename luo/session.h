// One session API over two backends (REFERENCE.md sections 1-3):
//  - KernelBackend (luo/kernel_backend.h): /dev/liveupdate, across a kexec of
//    the host kernel;
//  - ExecBackend (luo/exec_backend.h): the same semantics in userspace, across
//    an execve of a new vmm binary.
//
// Lifecycle, as in the kernel's luo_file.c:
//   old side: create_session(name) -> preserve(fd, token)... -> hand over
//             (kexec / exec). Destroying an outgoing session before the
//             handover cancels it: everything it preserved is dropped.
//   new side: retrieve_session(name) -> retrieve(token)... -> finish().
//
// Errors keep the kernel's errno meaning:
//   EINVAL  bad session name (empty, longer than 63 bytes, embedded NUL),
//           session already retrieved
//   EEXIST  duplicate session name or token
//   ENOENT  unknown session name or token; no LUO handler for this kind of file
//   EBADF   the fd to preserve is not open
//   ENOSPC  the session is full
//   EAGAIN  a guest_memfd retrieved before its VM (sticky, like every failed
//           retrieve)
//   EBUSY   /dev/liveupdate already open; finish with a guest_memfd retrieved
//           and its VM not
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"
#include "luo/uapi.h"

namespace vmm::luo {

// Longest session name, not counting the NUL the uAPI needs.
inline constexpr size_t kMaxSessionNameLength = uapi::kSessionNameLength - 1;

// The kernel serializes a session's files into two 4 KiB pages of 64-byte
// records (LUO_FILE_MAX in luo_file.c): 128 files. The exec backend enforces
// the same limit so a VMM that works with one backend works with the other.
inline constexpr size_t kMaxFilesPerSession = 128;

// EINVAL with the reason when `name` can't be a LUO session name.
[[nodiscard]] Result<void> validate_session_name(std::string_view name);

class Session {
 public:
  Session() = default;
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  virtual ~Session() = default;

  [[nodiscard]] virtual const std::string& name() const = 0;
  // True for a session retrieved from the previous kernel / process.
  [[nodiscard]] virtual bool incoming() const = 0;

  // Outgoing sessions: takes a reference to `fd`'s file under `token` (unique
  // in the session). From here on a memfd can't grow or shrink (EPERM) and a
  // guest_memfd can't allocate new pages: size and contents are what crosses.
  [[nodiscard]] virtual Result<void> preserve(FdRef fd, uint64_t token) = 0;

  // Incoming sessions: the file preserved under `token`, as a new O_CLOEXEC
  // descriptor the caller owns. Retrieving a token again gives another
  // descriptor for the same file; a failed retrieve stays failed. A KVM VM is
  // retrieved as a brand-new empty VM; retrieve it before its guest_memfds.
  [[nodiscard]] virtual Result<UniqueFd> retrieve(uint64_t token) = 0;

  // Incoming sessions: ends the handover. Files never retrieved are dropped;
  // descriptors already handed out stay valid. Idempotent.
  [[nodiscard]] virtual Result<void> finish() = 0;
};

class Backend {
 public:
  Backend() = default;
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;
  virtual ~Backend() = default;

  // "kernel" or "exec", for logs and error messages.
  [[nodiscard]] virtual std::string_view kind() const = 0;

  [[nodiscard]] virtual Result<std::unique_ptr<Session>> create_session(std::string_view name) = 0;
  [[nodiscard]] virtual Result<std::unique_ptr<Session>> retrieve_session(std::string_view name) = 0;
};

}  // namespace vmm::luo

// What kind of file a descriptor refers to, as far as LUO is concerned: the
// kernel picks a handler by file type (memfd_luo: shmem and unlinked;
// guest_memfd_luo: a guest_memfd; kvm_luo: a KVM VM). Userspace can only look
// from the outside: fstat, fstatfs and the /proc/self/fd link, whose names on
// Linux 6.18 are "/memfd:NAME (deleted)", "anon_inode:[kvm-gmem]" and
// "anon_inode:kvm-vm".
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm::luo {

enum class FileKind : uint32_t {
  other = 0,  // no LUO handler (regular file, pipe, socket, vCPU, hugetlb memfd...)
  memfd = 1,
  guest_memfd = 2,
  kvm_vm = 3,
};

[[nodiscard]] std::string_view to_string(FileKind kind);

struct FileInfo {
  FileKind kind = FileKind::other;
  std::string link;  // the /proc/self/fd target, for messages
  dev_t dev = 0;
  ino_t ino = 0;
  uint64_t size = 0;  // st_size: a memfd's or guest_memfd's size
  bool hugetlb = false;
};

// EBADF when `fd` is not open.
[[nodiscard]] Result<FileInfo> inspect_fd(FdRef fd);

// The /proc/self/fd link of `fd` ("?" when unreadable), for messages.
[[nodiscard]] std::string fd_link(int fd);

// ENOENT error for a file no LUO handler accepts, naming the file and what can
// be preserved.
[[nodiscard]] Error no_handler_error(int fd, const FileInfo& info);

}  // namespace vmm::luo

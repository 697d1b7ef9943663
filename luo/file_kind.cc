#include "luo/file_kind.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <array>
#include <fmt/format.h>

namespace vmm::luo {

namespace {

// guest_memfd moved onto its own pseudo filesystem after 6.18; on 6.18 it is
// an anonymous inode, so the link name is what tells it apart.
constexpr long kGuestMemfdMagic = 0x474d454d;  // "GMEM"

bool starts_with(std::string_view s, std::string_view prefix) { return s.starts_with(prefix); }

}  // namespace

std::string_view to_string(FileKind kind) {
  switch (kind) {
    case FileKind::memfd: return "memfd";
    case FileKind::guest_memfd: return "guest_memfd";
    case FileKind::kvm_vm: return "kvm-vm";
    case FileKind::other: break;
  }
  return "other";
}

std::string fd_link(int fd) {
  std::array<char, 512> target{};
  const std::string path = fmt::format("/proc/self/fd/{}", fd);
  const ssize_t n = ::readlink(path.c_str(), target.data(), target.size() - 1);
  if (n < 0) return "?";
  return std::string(target.data(), static_cast<size_t>(n));
}

Result<FileInfo> inspect_fd(FdRef fd) {
  struct stat st {};
  if (!fd.valid() || ::fstat(fd.get(), &st) != 0) {
    return std::unexpected(Error{EBADF, fmt::format("fd {} is not an open file descriptor", fd.get())});
  }
  struct statfs fs {};
  if (::fstatfs(fd.get(), &fs) != 0) return fail_errno(fmt::format("fstatfs(fd {})", fd.get()));

  FileInfo info;
  info.link = fd_link(fd.get());
  info.dev = st.st_dev;
  info.ino = st.st_ino;
  info.size = static_cast<uint64_t>(st.st_size);

  const auto fs_type = static_cast<long>(fs.f_type);
  // memfd_luo_can_preserve(): shmem_file(file) && !inode->i_nlink. A hugetlb
  // memfd lives on hugetlbfs, which has no LUO handler.
  if (S_ISREG(st.st_mode) && st.st_nlink == 0 && fs_type == static_cast<long>(TMPFS_MAGIC)) {
    info.kind = FileKind::memfd;
  } else if (S_ISREG(st.st_mode) && fs_type == static_cast<long>(HUGETLBFS_MAGIC)) {
    info.hugetlb = true;
  } else if (info.link == "anon_inode:kvm-vm") {
    info.kind = FileKind::kvm_vm;
  } else if (info.link == "anon_inode:[kvm-gmem]" || fs_type == kGuestMemfdMagic ||
             (starts_with(info.link, "anon_inode:") && info.link.find("kvm-gmem") != std::string::npos)) {
    info.kind = FileKind::guest_memfd;
  }
  return info;
}

Error no_handler_error(int fd, const FileInfo& info) {
  if (info.hugetlb) {
    return Error{ENOENT, fmt::format("no LUO handler for this kind of file: fd {} ({}) is a hugetlb memfd; "
                                     "LUO preserves only shmem memfds, create it without MFD_HUGETLB",
                                     fd, info.link)};
  }
  return Error{ENOENT, fmt::format("no LUO handler for this kind of file: fd {} ({}); only memfds, "
                                   "guest_memfds and KVM VM fds can be preserved",
                                   fd, info.link)};
}

}  // namespace vmm::luo

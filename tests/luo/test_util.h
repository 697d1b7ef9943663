// Small helpers shared by the LUO tests and their exec helper.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include "base/result.h"
#include "kvm/system.h"
#include "kvm/uapi.h"
#include "base/unique_fd.h"

namespace vmm::luo::testing {

// A memfd holding `contents`; sealable unless `allow_sealing` is false.
inline UniqueFd make_memfd(const char* name, std::string_view contents, bool allow_sealing = true) {
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC | (allow_sealing ? MFD_ALLOW_SEALING : 0)));
  if (fd.valid() && !contents.empty()) {
    if (::pwrite(fd.get(), contents.data(), contents.size(), 0) != static_cast<ssize_t>(contents.size())) {
      fd.reset();
    }
  }
  return fd;
}

inline std::string read_all(int fd) {
  std::string out;
  char buf[4096];
  off_t offset = 0;
  for (;;) {
    const ssize_t n = ::pread(fd, buf, sizeof(buf), offset);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
    offset += n;
  }
  return out;
}

inline ino_t inode_of(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
}

inline std::string link_of(int fd) {
  char target[256] = {};
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(path.c_str(), target, sizeof(target) - 1);
  return n > 0 ? std::string(target, static_cast<size_t>(n)) : std::string();
}

// The fds open in this process, without the one used to list them.
inline std::set<int> open_fds() {
  std::set<int> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return fds;
  const int self = ::dirfd(dir);
  while (const dirent* entry = ::readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (end != entry->d_name && *end == '\0' && fd != self) fds.insert(static_cast<int>(fd));
  }
  ::closedir(dir);
  return fds;
}

// Why KVM tests can't run here, or nothing when they can.
inline std::optional<std::string> kvm_unavailable() {
  auto system = kvm::System::open();
  if (!system) return "needs /dev/kvm: " + system.error().describe();
  auto gmem = system->check_extension(kvm::uapi::kCapGuestMemfd);
  if (!gmem || *gmem <= 0) return std::string("needs KVM guest_memfd (KVM_CAP_GUEST_MEMFD)");
  return std::nullopt;
}

inline constexpr uint64_t kGuestMemfdFlags =
    kvm::uapi::kGuestMemfdFlagMmap | kvm::uapi::kGuestMemfdFlagInitShared;

// Fills `size` bytes of a mappable file with `pattern` through a shared mapping.
inline bool fill_mapped(int fd, size_t size, uint8_t pattern) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return false;
  std::memset(p, pattern, size);
  ::munmap(p, size);
  return true;
}

// True when every byte of the first `size` bytes of `fd` is `pattern`.
inline bool check_mapped(int fd, size_t size, uint8_t pattern) {
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return false;
  const auto* bytes = static_cast<const uint8_t*>(p);
  bool ok = true;
  for (size_t i = 0; i < size && ok; ++i) ok = bytes[i] == pattern;
  ::munmap(p, size);
  return ok;
}

}  // namespace vmm::luo::testing

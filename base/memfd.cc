#include "base/memfd.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

namespace vmm {

Result<UniqueFd> sealed_memfd(const char* name, std::span<const uint8_t> bytes) {
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return fail_errno(fmt::format("cannot create the memfd '{}'", name));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pwrite(fd.get(), bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail_errno(fmt::format("cannot write the memfd '{}'", name));
    done += static_cast<size_t>(n);
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) != 0)
    return fail_errno(fmt::format("cannot seal the memfd '{}'", name));
  return fd;
}

Result<std::vector<uint8_t>> read_whole_file(FdRef fd, size_t max_bytes, const std::string& what) {
  struct stat st{};
  if (::fstat(fd.get(), &st) != 0) return fail_errno("cannot stat " + what);
  if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) > max_bytes)
    return fail(fmt::format("{} is {} bytes, more than the {} it can be", what, st.st_size, max_bytes), EPROTO);
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pread(fd.get(), bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno("cannot read " + what);
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  bytes.resize(done);
  return bytes;
}

}  // namespace vmm

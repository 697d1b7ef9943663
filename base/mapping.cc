#include "base/mapping.h"

#include <sys/mman.h>
#include <unistd.h>
#include <fmt/format.h>

#include <utility>

namespace vmm {

Result<Mapping> Mapping::map_shared(FdRef fd, size_t size, off_t offset) {
  if (size == 0) return fail("cannot map 0 bytes", EINVAL);
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), offset);
  if (addr == MAP_FAILED) {
    return fail_errno(fmt::format("mmap(MAP_SHARED) of {:#x} bytes of fd {} at offset {:#x}", size,
                                  fd.get(), offset));
  }
  return Mapping(addr, size);
}

Mapping::Mapping(Mapping&& other) noexcept
    : addr_(std::exchange(other.addr_, nullptr)), size_(std::exchange(other.size_, 0)) {}

Mapping& Mapping::operator=(Mapping&& other) noexcept {
  if (this != &other) {
    if (addr_ != nullptr) ::munmap(addr_, size_);
    addr_ = std::exchange(other.addr_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

Result<void> Mapping::populate_page_tables(size_t offset, size_t length) const {
  if (!valid()) return fail("populating an empty mapping");
  if (offset > size_ || length > size_ - offset) return fail("populating beyond the end of a mapping", EINVAL);
  if (length == 0) return {};
  if (::madvise(data() + offset, length, MADV_POPULATE_WRITE) == 0) return {};
  if (errno != ENOSYS)
    return fail_errno(errno == EINVAL ? "this kernel lacks MADV_POPULATE_WRITE (Linux 5.14)"
                                      : "cannot populate the page tables of a guest memory mapping");
  // A kernel without madvise(2) at all (CONFIG_ADVISE_SYSCALLS=n, as in small
  // configs): a read of one byte per page maps it too, changing nothing.
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  for (size_t at = offset; at < offset + length; at += page) {
    [[maybe_unused]] volatile uint8_t touched = data()[at];
  }
  return {};
}

Mapping::~Mapping() {
  if (addr_ != nullptr) ::munmap(addr_, size_);
}

}  // namespace vmm

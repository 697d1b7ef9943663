// A guest_memfd file: guest memory owned by KVM, bound to the VM that created it.
#pragma once

#include <cstdint>

#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm::kvm {

class GuestMemfd {
 public:
  GuestMemfd(UniqueFd fd, uint64_t size, uint64_t flags)
      : fd_(std::move(fd)), size_(size), flags_(flags) {}

  // Allocates every page up front with fallocate(FALLOC_FL_KEEP_SIZE): a
  // preserved guest_memfd keeps only pages present in its page cache.
  [[nodiscard]] Result<void> preallocate() const;

  [[nodiscard]] FdRef fd() const { return fd_.ref(); }
  [[nodiscard]] uint64_t size() const { return size_; }
  [[nodiscard]] uint64_t flags() const { return flags_; }
  // Hands the descriptor to a new owner (a memory region, a LUO session).
  [[nodiscard]] UniqueFd take_fd() && { return std::move(fd_); }

 private:
  UniqueFd fd_;
  uint64_t size_ = 0;
  uint64_t flags_ = 0;
};

}  // namespace vmm::kvm

#include "kvm/guest_memfd.h"

#include <fcntl.h>
#include <fmt/format.h>

namespace vmm::kvm {

Result<void> GuestMemfd::preallocate() const {
  // guest_memfd only implements FALLOC_FL_KEEP_SIZE (mode 0 is EOPNOTSUPP).
  // Allocation checks for signals page by page: EINTR leaves the pages
  // allocated so far in place, so retrying only does the rest.
  int ret;
  do {
    ret = ::fallocate(fd_.get(), FALLOC_FL_KEEP_SIZE, 0, static_cast<off_t>(size_));
  } while (ret < 0 && errno == EINTR);
  if (ret < 0) {
    return fail_errno(fmt::format("fallocate(FALLOC_FL_KEEP_SIZE) of {:#x} bytes of guest_memfd",
                                  size_));
  }
  return {};
}

}  // namespace vmm::kvm

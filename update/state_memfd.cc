#include "update/state_memfd.h"

#include <sys/mman.h>
#include <unistd.h>

namespace vmm {

Result<void> StateMemfd::create(uint64_t size) {
  fd.reset(::memfd_create("vmm-state", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return fail_errno("cannot create the state memfd");
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return fail_errno("cannot size the state memfd");
  VMM_TRY_ASSIGN(mapped, Mapping::map_shared(fd.ref(), size));
  VMM_TRY(with_context(mapped.populate_page_tables(), "preparing the state memfd"));
  mapping = std::move(mapped);
  return {};
}

uint64_t state_memfd_size(size_t vcpus) { return 256 * 1024 + uint64_t{vcpus} * 64 * 1024; }

}  // namespace vmm

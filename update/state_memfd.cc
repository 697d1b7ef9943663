#include "update/state_memfd.h"

#include "migration/state_blob.h"

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

uint64_t state_memfd_size(size_t vcpus, size_t regions) {
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t bound = migration::max_encoded_size(vcpus, regions);
  return (bound + page - 1) / page * page;
}

}  // namespace vmm

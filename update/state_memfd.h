// The memfd the freeze writes the saved state into: created, sized and
// mapped (every page allocated) while the guest still runs, because the first
// touch of a fresh memfd page costs tens of microseconds here and the state
// is written inside the blackout.
#pragma once

#include <cstddef>
#include <cstdint>

#include "base/mapping.h"
#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm {

struct StateMemfd {
  UniqueFd fd;
  Mapping mapping;

  [[nodiscard]] Result<void> create(uint64_t size);
};

// Room for the state of a VM with `vcpus` vCPUs and `regions` memory
// regions: the schema's upper bound (migration::max_encoded_size), page-aligned.
[[nodiscard]] uint64_t state_memfd_size(size_t vcpus, size_t regions);

}  // namespace vmm

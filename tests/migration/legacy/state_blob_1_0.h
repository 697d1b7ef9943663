// A frozen copy of the format-1.0 reader (see state_blob_1_0.cc).
#pragma once

#include <cstdint>
#include <span>

#include "base/result.h"
#include "migration/saved_state.h"
#include "migration/state_blob.h"

namespace vmm::migration::legacy_1_0 {

[[nodiscard]] Result<SavedState> decode(std::span<const uint8_t> blob);

}  // namespace vmm::migration::legacy_1_0

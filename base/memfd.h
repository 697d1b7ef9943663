// Small files passed between vmm processes: written once into a sealed
// memfd, read back whole with a size limit (a peer may be hostile or broken).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm {

// A close-on-exec memfd named `name` holding `bytes`, sealed against
// shrinking, growing and writing.
[[nodiscard]] Result<UniqueFd> sealed_memfd(const char* name, std::span<const uint8_t> bytes);

// The whole file `fd`, refused when it is larger than `max_bytes`; `what`
// names it in errors.
[[nodiscard]] Result<std::vector<uint8_t>> read_whole_file(FdRef fd, size_t max_bytes, const std::string& what);

}  // namespace vmm

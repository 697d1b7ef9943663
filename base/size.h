// Human-friendly byte sizes on the command line: "256M", "2G", "4096".
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/result.h"

namespace vmm {

// Parses a size with an optional binary suffix (K, M, G, T, optionally
// followed by "iB" or "B"; case-insensitive). "what" names the option in errors.
[[nodiscard]] Result<uint64_t> parse_size(std::string_view text, std::string_view what);

}  // namespace vmm

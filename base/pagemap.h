// Physical frame numbers of a mapping's pages, from /proc/self/pagemap: the
// evidence that guest memory stayed on the same pages across an update even
// where the file around them changed (a kexec gives a memfd a new inode).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"

namespace vmm {

struct FrameSample {
  uint64_t offset = 0;  // byte offset of the page in the mapping
  uint64_t pfn = 0;     // 0: not visible (the kernel shows PFNs to CAP_SYS_ADMIN only)
};

// Samples `count` pages spread evenly over `bytes` (first and last included),
// reads one byte of each so it is mapped here (read only: nothing changes),
// then reads their frames.
[[nodiscard]] Result<std::vector<FrameSample>> sample_frames(std::span<const uint8_t> bytes, size_t count);

}  // namespace vmm

// Physical frame numbers of a mapping's pages, from /proc/self/pagemap: the
// evidence that guest memory stayed on the same pages across an update even
// where the file around them changed (a kexec gives a memfd a new inode).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm {

struct FrameSample {
  uint64_t offset = 0;  // byte offset of the page in the mapping
  bool hole = false;    // the file has no page there yet (it reads as zeros)
  uint64_t pfn = 0;     // 0: a hole, or not visible (the kernel shows PFNs to CAP_SYS_ADMIN only)
};

// Samples `count` pages spread evenly over `bytes` (first and last
// included), the mapping of `file` from its start. A page the file has
// (SEEK_DATA) is read once so it is mapped here (read only: nothing
// changes), then its frame is read; a hole is reported as such and left
// alone, since reading it would map the shared zero page at best.
[[nodiscard]] Result<std::vector<FrameSample>> sample_frames(std::span<const uint8_t> bytes, FdRef file,
                                                             size_t count);
// The same at the given page-aligned offsets.
[[nodiscard]] Result<std::vector<FrameSample>> sample_frames_at(std::span<const uint8_t> bytes, FdRef file,
                                                                std::span<const uint64_t> offsets);
// `count` page offsets spread evenly over `bytes` bytes, first and last page included.
[[nodiscard]] std::vector<uint64_t> spread_offsets(uint64_t bytes, size_t count);

}  // namespace vmm

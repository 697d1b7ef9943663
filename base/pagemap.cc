#include "base/pagemap.h"

#include <fcntl.h>
#include <unistd.h>

#include "base/unique_fd.h"

namespace vmm {

Result<std::vector<FrameSample>> sample_frames(std::span<const uint8_t> bytes, size_t count) {
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t pages = bytes.size() / page;
  std::vector<FrameSample> samples;
  if (pages == 0 || count == 0) return samples;
  if (count > pages) count = pages;
  UniqueFd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pagemap) return fail_errno("cannot open /proc/self/pagemap");
  for (size_t i = 0; i < count; ++i) {
    const uint64_t index = count == 1 ? 0 : i * (pages - 1) / (count - 1);
    const uint64_t offset = index * page;
    // A present entry needs the page mapped in this process.
    [[maybe_unused]] volatile uint8_t touched = bytes[offset];
    const auto address = reinterpret_cast<uintptr_t>(bytes.data()) + offset;
    uint64_t entry = 0;
    if (::pread(pagemap.get(), &entry, sizeof(entry), static_cast<off_t>(address / page * sizeof(entry))) !=
        static_cast<ssize_t>(sizeof(entry)))
      return fail_errno("cannot read /proc/self/pagemap");
    constexpr uint64_t kPresent = 1ULL << 63;
    constexpr uint64_t kPfnMask = (1ULL << 55) - 1;
    samples.push_back({offset, (entry & kPresent) ? entry & kPfnMask : 0});
  }
  return samples;
}

}  // namespace vmm

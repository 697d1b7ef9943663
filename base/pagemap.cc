#include "base/pagemap.h"

#include <fcntl.h>
#include <cerrno>
#include <unistd.h>

#include "base/unique_fd.h"

namespace vmm {

std::vector<uint64_t> spread_offsets(uint64_t bytes, size_t count) {
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t pages = bytes / page;
  std::vector<uint64_t> offsets;
  if (pages == 0 || count == 0) return offsets;
  if (count > pages) count = pages;
  for (size_t i = 0; i < count; ++i) offsets.push_back((count == 1 ? 0 : i * (pages - 1) / (count - 1)) * page);
  return offsets;
}

Result<std::vector<FrameSample>> sample_frames_at(std::span<const uint8_t> bytes, FdRef file,
                                                  std::span<const uint64_t> offsets) {
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  std::vector<FrameSample> samples;
  if (offsets.empty()) return samples;
  UniqueFd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pagemap) return fail_errno("cannot open /proc/self/pagemap");
  for (const uint64_t offset : offsets) {
    if (offset % page != 0 || offset >= bytes.size())
      return fail("a sampled page lies outside the mapping or is not page-aligned", EINVAL);
    if (file.valid()) {
      // A file that cannot tell (guest_memfd has no SEEK_DATA: EINVAL) is
      // taken as data; ENXIO or a later offset is a hole.
      const off_t data = ::lseek(file.get(), static_cast<off_t>(offset), SEEK_DATA);
      const bool hole = data < 0 ? errno == ENXIO : data != static_cast<off_t>(offset);
      if (hole) {
        samples.push_back({offset, true, 0});
        continue;
      }
    }
    // A present entry needs the page mapped in this process.
    [[maybe_unused]] volatile uint8_t touched = bytes[offset];
    const auto address = reinterpret_cast<uintptr_t>(bytes.data()) + offset;
    uint64_t entry = 0;
    if (::pread(pagemap.get(), &entry, sizeof(entry), static_cast<off_t>(address / page * sizeof(entry))) !=
        static_cast<ssize_t>(sizeof(entry)))
      return fail_errno("cannot read /proc/self/pagemap");
    constexpr uint64_t kPresent = 1ULL << 63;
    constexpr uint64_t kPfnMask = (1ULL << 55) - 1;
    samples.push_back({offset, false, (entry & kPresent) ? entry & kPfnMask : 0});
  }
  return samples;
}

Result<std::vector<FrameSample>> sample_frames(std::span<const uint8_t> bytes, FdRef file, size_t count) {
  const auto offsets = spread_offsets(bytes.size(), count);
  return sample_frames_at(bytes, file, offsets);
}

}  // namespace vmm

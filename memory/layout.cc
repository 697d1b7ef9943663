#include "memory/layout.h"

#include <fmt/format.h>

#include <algorithm>

namespace vmm::memory {

std::string_view to_string(Backing backing) {
  switch (backing) {
    case Backing::guest_memfd: return "guest_memfd";
    case Backing::memfd: return "memfd";
  }
  return "unknown";
}

std::optional<Backing> backing_from_string(std::string_view name) {
  if (name == "guest_memfd") return Backing::guest_memfd;
  if (name == "memfd") return Backing::memfd;
  return std::nullopt;
}

std::string_view to_string(RegionRole role) {
  switch (role) {
    case RegionRole::ram: return "ram";
    case RegionRole::shared: return "shared";
  }
  return "unknown";
}

std::string format_size(uint64_t bytes) {
  struct Unit {
    uint64_t size;
    const char* name;
  };
  static constexpr Unit kUnits[] = {{1ULL << 40, "TiB"}, {1ULL << 30, "GiB"}, {1ULL << 20, "MiB"},
                                    {1ULL << 10, "KiB"}};
  for (const Unit& unit : kUnits) {
    if (bytes < unit.size) continue;
    if (bytes % unit.size == 0) return fmt::format("{} {}", bytes / unit.size, unit.name);
    return fmt::format("{:.2f} {}", static_cast<double>(bytes) / static_cast<double>(unit.size),
                       unit.name);
  }
  return fmt::format("{} bytes", bytes);
}

Result<MemoryLayout> MemoryLayout::plan(uint64_t ram_size, uint64_t shared_size,
                                        Backing ram_backing) {
  if (ram_size == 0) return fail("guest RAM size is 0: the guest needs at least one page", EINVAL);
  if (ram_size % kPageSize != 0) {
    return fail(fmt::format("guest RAM size {} ({:#x}) is not a multiple of the page size ({} bytes)",
                            ram_size, ram_size, kPageSize),
                EINVAL);
  }
  if (ram_size > kMaxRamSize) {
    return fail(fmt::format("guest RAM size {} is larger than the {} the guest physical address "
                            "space can hold",
                            format_size(ram_size), format_size(kMaxRamSize)),
                EINVAL);
  }
  if (shared_size == 0 || shared_size % kPageSize != 0 || shared_size > kSharedRegionMaxSize) {
    return fail(fmt::format("shared region size {} ({:#x}) is out of range: it must be a non-zero "
                            "multiple of the page size ({} bytes) and at most {}",
                            shared_size, shared_size, kPageSize, format_size(kSharedRegionMaxSize)),
                EINVAL);
  }

  MemoryLayout layout;
  uint32_t next_slot = 0;
  const uint64_t low = std::min(ram_size, kLowRamEnd);
  layout.regions.push_back({.name = "ram0", .role = RegionRole::ram, .backing = ram_backing,
                            .gpa = 0, .size = low, .slot = next_slot++});
  if (ram_size > low) {
    layout.regions.push_back({.name = "ram1", .role = RegionRole::ram, .backing = ram_backing,
                              .gpa = kHighRamStart, .size = ram_size - low, .slot = next_slot++});
  }
  // Always a memfd: the VMM and tools share it, and the live update seals it.
  layout.regions.push_back({.name = "shared", .role = RegionRole::shared,
                            .backing = Backing::memfd, .gpa = kSharedRegionGpa,
                            .size = shared_size, .slot = next_slot++});
  return layout;
}

uint64_t MemoryLayout::ram_size() const {
  uint64_t total = 0;
  for (const RegionSpec& region : regions) {
    if (region.role == RegionRole::ram) total += region.size;
  }
  return total;
}

const RegionSpec* MemoryLayout::find(std::string_view name) const {
  auto it = std::ranges::find(regions, name, &RegionSpec::name);
  return it == regions.end() ? nullptr : &*it;
}

const RegionSpec* MemoryLayout::shared() const {
  auto it = std::ranges::find(regions, RegionRole::shared, &RegionSpec::role);
  return it == regions.end() ? nullptr : &*it;
}

}  // namespace vmm::memory

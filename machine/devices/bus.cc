#include "machine/devices/bus.h"

#include <fmt/format.h>

namespace vmm::devices {

Result<void> Bus::add(uint64_t base, uint64_t length, BusDevice* device) {
  if (length == 0) return fail(fmt::format("{} bus: empty range at 0x{:x}", name_, base));
  auto next = ranges_.lower_bound(base);
  if (next != ranges_.end() && next->first < base + length)
    return fail(fmt::format("{} bus: range 0x{:x}+0x{:x} overlaps 0x{:x}", name_, base, length, next->first));
  if (next != ranges_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.length > base)
      return fail(fmt::format("{} bus: range 0x{:x}+0x{:x} overlaps 0x{:x}", name_, base, length, prev->first));
  }
  ranges_.emplace(base, Range{length, device});
  return {};
}

const std::pair<const uint64_t, Bus::Range>* Bus::find(uint64_t address) const {
  auto it = ranges_.upper_bound(address);
  if (it == ranges_.begin()) return nullptr;
  --it;
  if (address - it->first >= it->second.length) return nullptr;
  return &*it;
}

bool Bus::read(uint64_t address, std::span<uint8_t> data) const {
  const auto* entry = find(address);
  if (!entry) return false;
  entry->second.device->read(address - entry->first, data);
  return true;
}

bool Bus::write(uint64_t address, std::span<const uint8_t> data) const {
  const auto* entry = find(address);
  if (!entry) return false;
  entry->second.device->write(address - entry->first, data);
  return true;
}

}  // namespace vmm::devices

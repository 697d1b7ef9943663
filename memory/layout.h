// Where guest memory lives: plain data, saved with the VM state (RAM itself is
// never serialized; a region is referenced by its name and LUO token).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace vmm::memory {

enum class Backing : uint32_t { guest_memfd = 0, memfd = 1 };
[[nodiscard]] std::string_view to_string(Backing backing);
[[nodiscard]] std::optional<Backing> backing_from_string(std::string_view name);

// How a region's backing file is attached to KVM.
enum class SlotKind : uint32_t {
  guest_memfd,  // KVM_MEM_GUEST_MEMFD slot on the region's own guest_memfd
  userspace,    // ordinary slot on the VMM's mapping of the file (memfd, or a
                // guest_memfd inherited across exec that KVM won't rebind)
};
[[nodiscard]] std::string_view to_string(SlotKind kind);

enum class RegionRole : uint32_t { ram = 0, shared = 1 };
[[nodiscard]] std::string_view to_string(RegionRole role);

// "3 GiB", "1.50 GiB", "4096 bytes": sizes in messages.
[[nodiscard]] std::string format_size(uint64_t bytes);

struct RegionSpec {
  std::string name;  // "ram0", "ram1", "shared"
  RegionRole role = RegionRole::ram;
  Backing backing = Backing::guest_memfd;
  uint64_t gpa = 0;
  uint64_t size = 0;
  uint32_t slot = 0;  // KVM memslot number
  friend bool operator==(const RegionSpec&, const RegionSpec&) = default;
};

inline constexpr uint64_t kPageSize = 4096;
// RAM below 4 GiB stops here; the rest of it starts at 4 GiB.
inline constexpr uint64_t kLowRamEnd = 0xC000'0000;
inline constexpr uint64_t kHighRamStart = 0x1'0000'0000;
// The shared region sits in the hole below 4 GiB, under the LAPIC/IOAPIC range.
inline constexpr uint64_t kSharedRegionGpa = 0xD000'0000;
inline constexpr uint64_t kSharedRegionMaxSize = 0x1000'0000;  // 256 MiB
inline constexpr uint64_t kDefaultSharedSize = 16ULL << 20;
// Guest-physical addresses stop at 2^46 here (a conservative physical
// address width); RAM beyond that cannot be placed.
inline constexpr uint64_t kMaxRamSize = (1ULL << 46) - (kHighRamStart - kLowRamEnd);

struct MemoryLayout {
  std::vector<RegionSpec> regions;

  // RAM split around the hole below 4 GiB (one or two regions, `ram_backing`)
  // plus the shared memfd region. Fails with a clear message on a zero or
  // unaligned size, or a shared size out of range.
  [[nodiscard]] static Result<MemoryLayout> plan(uint64_t ram_size, uint64_t shared_size,
                                                 Backing ram_backing);

  [[nodiscard]] uint64_t ram_size() const;
  [[nodiscard]] const RegionSpec* find(std::string_view name) const;
  [[nodiscard]] const RegionSpec* shared() const;
  friend bool operator==(const MemoryLayout&, const MemoryLayout&) = default;
};

}  // namespace vmm::memory

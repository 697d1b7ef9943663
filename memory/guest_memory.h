// Guest memory: the regions of a MemoryLayout, each backed by a guest_memfd or
// a memfd, mapped MAP_SHARED into the VMM and registered as a KVM memslot.
// GPA lookups go through a Boost.Intrusive set keyed by GPA.
#pragma once

#include <boost/intrusive/set.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "kvm/vm.h"
#include "memory/layout.h"
#include "base/mapping.h"

namespace vmm::memory {


class Region : public boost::intrusive::set_base_hook<boost::intrusive::optimize_size<true>> {
 public:
  Region(RegionSpec spec, UniqueFd fd, Mapping mapping, SlotKind slot_kind)
      : spec_(std::move(spec)), fd_(std::move(fd)), mapping_(std::move(mapping)),
        slot_kind_(slot_kind) {}

  [[nodiscard]] const RegionSpec& spec() const { return spec_; }
  [[nodiscard]] uint64_t gpa() const { return spec_.gpa; }
  [[nodiscard]] uint64_t size() const { return spec_.size; }
  [[nodiscard]] uint64_t end() const { return spec_.gpa + spec_.size; }
  [[nodiscard]] bool contains(uint64_t gpa) const { return gpa >= spec_.gpa && gpa < end(); }
  [[nodiscard]] FdRef fd() const { return fd_.ref(); }
  [[nodiscard]] uint8_t* host() const { return mapping_.data(); }
  [[nodiscard]] SlotKind slot_kind() const { return slot_kind_; }
  [[nodiscard]] uint32_t slot() const { return spec_.slot; }
  [[nodiscard]] std::span<uint8_t> bytes() const { return mapping_.bytes(); }
  [[nodiscard]] Result<void> populate_page_tables() const { return mapping_.populate_page_tables(); }
  [[nodiscard]] Result<void> populate_page_tables(size_t offset, size_t length) const {
    return mapping_.populate_page_tables(offset, length);
  }

  friend bool operator<(const Region& a, const Region& b) { return a.gpa() < b.gpa(); }

 private:
  RegionSpec spec_;
  UniqueFd fd_;
  Mapping mapping_;
  SlotKind slot_kind_;
};

class GuestMemory {
 public:
  // Creates every region of `layout`: RAM in guest_memfd (MMAP|INIT_SHARED)
  // or memfd, fully preallocated, mapped MAP_SHARED and registered with KVM.
  // On failure nothing is left registered or allocated. Fails up front (ENOMEM)
  // when the layout asks for more than the host's MemAvailable.
  //
  // The memslots point at this object's mappings and are not removed by its
  // destructor: destroy the Vm first, or together with it.
  [[nodiscard]] static Result<GuestMemory> create(kvm::Vm& vm, const MemoryLayout& layout);

  // Builds the regions of `layout` around existing files (one per region, in
  // layout order) without touching their contents: used after a live update.
  // Each file's size must equal its region's. `guest_memfd_slot_kind` says how
  // guest_memfd regions are attached; memfd regions always get ordinary slots.
  [[nodiscard]] static Result<GuestMemory> attach(kvm::Vm& vm, const MemoryLayout& layout,
                                                  std::vector<UniqueFd> files,
                                                  SlotKind guest_memfd_slot_kind);

  GuestMemory(GuestMemory&&) noexcept;
  GuestMemory& operator=(GuestMemory&&) noexcept;
  ~GuestMemory();

  // The region containing `gpa`, or nullptr.
  [[nodiscard]] const Region* find(uint64_t gpa) const;
  // Host view of [gpa, gpa+len); fails unless the range lies inside one region.
  [[nodiscard]] Result<std::span<uint8_t>> translate(uint64_t gpa, uint64_t len) const;
  [[nodiscard]] Result<void> write(uint64_t gpa, std::span<const uint8_t> data) const;
  [[nodiscard]] Result<void> read(uint64_t gpa, std::span<uint8_t> out) const;

  [[nodiscard]] const MemoryLayout& layout() const { return layout_; }
  [[nodiscard]] const std::vector<std::unique_ptr<Region>>& regions() const { return regions_; }
  [[nodiscard]] const Region* region(std::string_view name) const;

 private:
  using RegionSet = boost::intrusive::set<Region>;
  GuestMemory() = default;
  MemoryLayout layout_;
  std::vector<std::unique_ptr<Region>> regions_;
  RegionSet by_gpa_;
};

}  // namespace vmm::memory

#include "memory/guest_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>

#include "kvm/uapi.h"

namespace vmm::memory {

std::string_view to_string(SlotKind kind) {
  switch (kind) {
    case SlotKind::guest_memfd: return "guest_memfd";
    case SlotKind::userspace: return "userspace";
  }
  return "unknown";
}

namespace {

constexpr uint64_t kGuestMemfdFlags =
    kvm::uapi::kGuestMemfdFlagMmap | kvm::uapi::kGuestMemfdFlagInitShared;

std::string describe(const RegionSpec& spec) {
  return fmt::format("region '{}' ({} {} at GPA {:#x})", spec.name, format_size(spec.size),
                     to_string(spec.backing), spec.gpa);
}

// Memslots registered while building a GuestMemory: deleted again unless the
// whole build succeeds, so that a failure leaves the VM as it was.
class SlotRollback {
 public:
  explicit SlotRollback(kvm::Vm& vm) : vm_(vm) {}
  SlotRollback(const SlotRollback&) = delete;
  SlotRollback& operator=(const SlotRollback&) = delete;
  ~SlotRollback() {
    for (uint32_t slot : registered_) {
      if (auto cleared = vm_.clear_memory_slot(slot); !cleared) {
        spdlog::debug("memory: rollback of memslot {} failed: {}", slot, cleared.error().describe());
      }
    }
  }
  void add(uint32_t slot) { registered_.push_back(slot); }
  void commit() { registered_.clear(); }

 private:
  kvm::Vm& vm_;
  std::vector<uint32_t> registered_;
};

// MemAvailable from /proc/meminfo, in bytes; nullopt if it cannot be read.
std::optional<uint64_t> host_available_memory() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return std::nullopt;
}

// Preallocating more than the host has would push it into reclaim and then
// the OOM killer (guest_memfd and memfd allocations fail late, if at all),
// so an impossible request is refused before anything is allocated.
Result<void> check_host_can_provide(const MemoryLayout& layout) {
  const uint64_t ram = layout.ram_size();
  const uint64_t shared = layout.shared() != nullptr ? layout.shared()->size : 0;
  const std::optional<uint64_t> available = host_available_memory();
  if (available && ram + shared > *available) {
    return fail(fmt::format("{} of guest RAM (+ {} shared) was asked for, but the host cannot "
                            "provide it: only {} is available (MemAvailable); lower the guest's "
                            "memory size",
                            format_size(ram), format_size(shared), format_size(*available)),
                ENOMEM);
  }
  return {};
}

Error allocation_error(const RegionSpec& spec, const Error& error) {
  if (error.code == ENOMEM || error.code == ENOSPC) {
    return Error{error.code,
                 fmt::format("cannot allocate {} for {}: the host cannot provide that much memory "
                             "({})",
                             format_size(spec.size), describe(spec), error.message)};
  }
  return error.with_context(describe(spec));
}

Result<UniqueFd> create_memfd(const RegionSpec& spec) {
  const std::string name = "vmm-" + spec.name;
  // Sealing allowed: the live update seals the shared region (F_SEAL_GROW/SHRINK).
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return fail_errno(fmt::format("memfd_create for {}", describe(spec)));
  if (::ftruncate(fd.get(), static_cast<off_t>(spec.size)) < 0) {
    return fail_errno(fmt::format("ftruncate of the memfd of {}", describe(spec)));
  }
  int ret;
  do {
    ret = ::fallocate(fd.get(), 0, 0, static_cast<off_t>(spec.size));
  } while (ret < 0 && errno == EINTR);
  if (ret < 0) {
    return std::unexpected(allocation_error(spec, Error{errno, "fallocate of the memfd"}));
  }
  return fd;
}

Result<UniqueFd> create_guest_memfd(kvm::Vm& vm, const RegionSpec& spec) {
  auto gmem = vm.create_guest_memfd(spec.size, kGuestMemfdFlags);
  if (!gmem) return std::unexpected(gmem.error().with_context(describe(spec)));
  if (auto allocated = gmem->preallocate(); !allocated) {
    return std::unexpected(allocation_error(spec, allocated.error()));
  }
  return std::move(*gmem).take_fd();
}

Result<std::unique_ptr<Region>> map_and_register(kvm::Vm& vm, const RegionSpec& spec, UniqueFd fd,
                                                 SlotKind kind, SlotRollback& rollback) {
  auto mapping = Mapping::map_shared(fd.ref(), spec.size);
  if (!mapping) return std::unexpected(mapping.error().with_context(describe(spec)));
  auto registered = vm.set_memory_slot(kvm::MemorySlot{
      .slot = spec.slot,
      .guest_phys_addr = spec.gpa,
      .size = spec.size,
      // guest_memfd slots too: KVM's own accesses to guest memory (the
      // instruction emulator, kvmclock) go through this address.
      .host_address = mapping->data(),
      .guest_memfd = kind == SlotKind::guest_memfd ? fd.ref() : FdRef(),
      .guest_memfd_offset = 0,
  });
  if (!registered) {
    return std::unexpected(registered.error().with_context(
        fmt::format("{} as a {} memslot", describe(spec), to_string(kind))));
  }
  rollback.add(spec.slot);
  return std::make_unique<Region>(spec, std::move(fd), std::move(*mapping), kind);
}

using Clock = std::chrono::steady_clock;
double elapsed_ms(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since).count();
}

}  // namespace

Result<GuestMemory> GuestMemory::create(kvm::Vm& vm, const MemoryLayout& layout) {
  VMM_TRY(check_host_can_provide(layout));
  GuestMemory memory;  // on failure, destroyed (unmapped, closed) after the rollback
  SlotRollback rollback(vm);
  memory.layout_ = layout;
  for (const RegionSpec& spec : layout.regions) {
    const auto start = Clock::now();
    const bool in_guest_memfd = spec.backing == Backing::guest_memfd;
    VMM_TRY_ASSIGN(fd, in_guest_memfd ? create_guest_memfd(vm, spec) : create_memfd(spec));
    const double allocate_ms = elapsed_ms(start);
    const SlotKind kind = in_guest_memfd ? SlotKind::guest_memfd : SlotKind::userspace;
    VMM_TRY_ASSIGN(region, map_and_register(vm, spec, std::move(fd), kind, rollback));
    spdlog::debug("memory: {} allocated in {:.1f} ms, mapped and registered in {:.1f} ms",
                  describe(spec), allocate_ms, elapsed_ms(start) - allocate_ms);
    memory.by_gpa_.insert(*region);
    memory.regions_.push_back(std::move(region));
  }
  rollback.commit();
  return memory;
}

Result<GuestMemory> GuestMemory::attach(kvm::Vm& vm, const MemoryLayout& layout,
                                        std::vector<UniqueFd> files,
                                        SlotKind guest_memfd_slot_kind) {
  if (files.size() != layout.regions.size()) {
    return fail(fmt::format("attach: {} files for {} memory regions", files.size(),
                            layout.regions.size()),
                EINVAL);
  }
  GuestMemory memory;  // on failure, destroyed (unmapped, closed) after the rollback
  SlotRollback rollback(vm);
  memory.layout_ = layout;
  for (size_t i = 0; i < files.size(); ++i) {
    const RegionSpec& spec = layout.regions[i];
    struct stat file_stat{};
    if (::fstat(files[i].get(), &file_stat) < 0) {
      return fail_errno(fmt::format("fstat of the file for {}", describe(spec)));
    }
    if (static_cast<uint64_t>(file_stat.st_size) != spec.size) {
      return fail(fmt::format("the file for {} is {} bytes, but the region is {} bytes: it is not "
                              "this region's memory",
                              describe(spec), file_stat.st_size, spec.size),
                  EINVAL);
    }
    const SlotKind kind =
        spec.backing == Backing::guest_memfd ? guest_memfd_slot_kind : SlotKind::userspace;
    VMM_TRY_ASSIGN(region, map_and_register(vm, spec, std::move(files[i]), kind, rollback));
    memory.by_gpa_.insert(*region);
    memory.regions_.push_back(std::move(region));
  }
  rollback.commit();
  return memory;
}

GuestMemory::GuestMemory(GuestMemory&& other) noexcept
    : layout_(std::move(other.layout_)),
      regions_(std::move(other.regions_)),
      by_gpa_(std::move(other.by_gpa_)) {}

GuestMemory& GuestMemory::operator=(GuestMemory&& other) noexcept {
  if (this != &other) {
    // Unlink our regions before they are freed; then take over the other's.
    by_gpa_.clear();
    layout_ = std::move(other.layout_);
    regions_ = std::move(other.regions_);
    by_gpa_.swap(other.by_gpa_);
  }
  return *this;
}

GuestMemory::~GuestMemory() {
  // The set only links the regions; unlink them before regions_ frees them.
  by_gpa_.clear();
}

const Region* GuestMemory::find(uint64_t gpa) const {
  struct ByGpa {
    bool operator()(uint64_t key, const Region& region) const { return key < region.gpa(); }
    bool operator()(const Region& region, uint64_t key) const { return region.gpa() < key; }
  };
  // The last region starting at or below `gpa` is the only candidate.
  auto it = by_gpa_.upper_bound(gpa, ByGpa{});
  if (it == by_gpa_.begin()) return nullptr;
  --it;
  return it->contains(gpa) ? &*it : nullptr;
}

Result<std::span<uint8_t>> GuestMemory::translate(uint64_t gpa, uint64_t len) const {
  const Region* region = find(gpa);
  if (region == nullptr) return fail(fmt::format("GPA {:#x} is not in guest memory", gpa), EFAULT);
  const uint64_t offset = gpa - region->gpa();
  if (len > region->size() - offset) {
    return fail(fmt::format("GPA range [{:#x}, +{:#x}) runs past the end of region '{}' at {:#x}",
                            gpa, len, region->spec().name, region->end()),
                EFAULT);
  }
  return std::span<uint8_t>(region->host() + offset, len);
}

Result<void> GuestMemory::write(uint64_t gpa, std::span<const uint8_t> data) const {
  VMM_TRY_ASSIGN(target, translate(gpa, data.size()));
  std::ranges::copy(data, target.begin());
  return {};
}

Result<void> GuestMemory::read(uint64_t gpa, std::span<uint8_t> out) const {
  VMM_TRY_ASSIGN(source, translate(gpa, out.size()));
  std::ranges::copy(source, out.begin());
  return {};
}

const Region* GuestMemory::region(std::string_view name) const {
  auto it = std::ranges::find_if(regions_, [&](const auto& r) { return r->spec().name == name; });
  return it == regions_.end() ? nullptr : it->get();
}

}  // namespace vmm::memory
